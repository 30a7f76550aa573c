"""Tests of simflow.fid: the torch-fidelity path against a direct computation, npz formats, errors, REPA tokens."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from simflow import fid
from simflow.classifier import classifier_patch_tokens, load_classifier, train_feature_extractor
from simflow.data import build_dataset
from simflow.fid import (
    FeatureExtractorWeightsError,
    NpzImages,
    compute_metrics,
    compute_reference_statistics,
    frechet_distance,
    images_to_uint8,
    load_reference_statistics,
    register_classifier_extractor,
)
from simflow.io import save_samples_npz

from helpers_fid import digits_uint8, torch_threads, write_random_classifier

TRAINED = "simflow-test-trained"
RANDOM = "simflow-test-random"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SmallClassifier trained briefly on 16x16 digits, registered as TRAINED: (checkpoint, train result)."""
    ckpt = tmp_path_factory.mktemp("clf") / "classifier.pt"
    train = build_dataset("digits", None, "train", 16)
    test = build_dataset("digits", None, "test", 16)
    result = train_feature_extractor(train, ckpt, steps=80, batch_size=64, lr=3e-3, seed=0,
                                         eval_dataset=test, width=8, feature_dim=32, device="cpu")
    register_classifier_extractor(ckpt, TRAINED)
    return ckpt, result


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained):
    """Sample npz files (digits test split, digits train split, uniform noise) and train-set reference stats."""
    d = tmp_path_factory.mktemp("npz")
    test_u8, test_y = digits_uint8("test")
    train_u8, _ = digits_uint8("train")
    noise = np.random.default_rng(0).integers(0, 256, size=test_u8.shape, dtype=np.uint8)
    paths = {
        "test": save_samples_npz(d / "test.npz", test_u8, test_y),
        "train": save_samples_npz(d / "train.npz", train_u8),
        "noise": save_samples_npz(d / "noise.npz", noise),
    }
    paths["ref"] = compute_reference_statistics(build_dataset("digits", None, "train", 16), d / "ref_train.npz",
                                                feature_extractor=TRAINED, batch_size=256, cuda=False)
    return paths


def direct_features(ckpt: Path, uint8_nhwc: np.ndarray) -> np.ndarray:
    """Features computed by calling the classifier directly (no torch-fidelity)."""
    model = load_classifier(ckpt)
    x = torch.from_numpy(np.asarray(uint8_nhwc)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return model.forward_features(x)[0].double().numpy()


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


# ------------------------------------------------------------------------------------------------ formats


def test_images_to_uint8_dit_formula():
    x = torch.tensor([-1.0, -0.996, 0.0, 0.5, 1.0, -3.0, 3.0]).view(1, 1, 1, 7)
    # 127.5 * x + 128, clamped, truncated: -1 -> 0.5 -> 0; -0.996 -> 1.01 -> 1; 0.5 -> 191.75 -> 191; 1 -> 255.5 -> 255.
    assert images_to_uint8(x).flatten().tolist() == [0, 1, 128, 191, 255, 0, 255]
    out = images_to_uint8(torch.zeros(2, 3, 4, 5))
    assert out.shape == (2, 4, 5, 3) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="float"):
        images_to_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="B, C, H, W"):
        images_to_uint8(torch.zeros(3, 4, 4))


def test_samples_npz_roundtrip_and_npz_images(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(6, 5, 7, 1), dtype=np.uint8)
    labels = np.arange(6) % 3
    path = save_samples_npz(tmp_path / "sub" / "samples.npz", gray, labels)
    with np.load(path) as npz:  # the ADM layout: arr_0 images, arr_1 labels
        assert np.array_equal(npz["arr_0"], gray) and np.array_equal(npz["arr_1"], labels)
    ds = NpzImages(path)
    assert isinstance(ds.images, np.memmap)  # uncompressed npz is memory-mapped, not read whole
    assert len(ds) == 6 and np.array_equal(ds.labels, labels)
    item = ds[2]
    assert item.dtype == torch.uint8 and item.shape == (3, 5, 7)
    for c in range(3):  # grayscale repeated to RGB, as torch-fidelity requires
        assert np.array_equal(item[c].numpy(), gray[2, :, :, 0])
    rgb = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=rgb)
    ds2 = NpzImages(tmp_path / "compressed.npz")
    assert ds2.labels is None and np.array_equal(ds2[3].permute(1, 2, 0).numpy(), rgb[3])
    with pytest.raises(ValueError, match="uint8 NHWC"):
        save_samples_npz(tmp_path / "bad.npz", rgb.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        save_samples_npz(tmp_path / "bad.npz", rgb, np.arange(3))


def test_frechet_distance_analytic_and_matches_torch_fidelity():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    # Diagonal covariances: |dmu|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) = 5 + (1+4-4) + (4+1-4) + (9+1-6)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + 1 + 1 + 4, rel=1e-9)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(300, 16)) * 1.5 + 0.3
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = fid_statistics_to_metric({"mu": m1, "sigma": c1}, {"mu": m2, "sigma": c2}, False)["frechet_inception_distance"]
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(m1, c1, m2[:3], c2[:3, :3])


# ------------------------------------------------------------------------------------------------ classifier proxy


def test_classifier_trains_and_checkpoint_reloads(trained):
    ckpt, result = trained
    assert result["accuracy_split"] == "eval" and result["accuracy"] > 0.8  # chance is 0.1
    model = load_classifier(ckpt)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    test = build_dataset("digits", None, "test", 16)
    with torch.no_grad():
        acc = (model(test.images).argmax(1).numpy() == test.labels).mean()
    assert acc == pytest.approx(result["accuracy"], abs=1e-9)


def test_reference_statistics_match_direct_features(trained, files):
    ckpt, _ = trained
    with np.load(files["ref"]) as npz:
        assert str(npz["feature_extractor"]) == TRAINED and int(npz["num_images"]) == 1438
    mu, sigma = load_reference_statistics(files["ref"])
    mu_d, sigma_d = stats(direct_features(ckpt, digits_uint8("train")[0]))
    np.testing.assert_allclose(mu, mu_d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma_d, rtol=1e-4, atol=1e-6)


def test_fid_matches_direct_and_calculate_metrics(trained, files):
    import torch_fidelity

    ckpt, _ = trained
    out = compute_metrics(files["test"], files["ref"], feature_extractor=TRAINED, isc=False, kid=False, cuda=False)
    assert out["num_samples"] == 359 and out["feature_extractor"] == TRAINED
    direct = frechet_distance(*stats(direct_features(ckpt, digits_uint8("test")[0])),
                              *stats(direct_features(ckpt, digits_uint8("train")[0])))
    assert out["fid"] == pytest.approx(direct, rel=1e-4)
    # torch-fidelity's public entry point on the same two image sets agrees too.
    public = torch_fidelity.calculate_metrics(
        input1=NpzImages(files["test"]), input2=NpzImages(files["train"]), fid=True, feature_extractor=TRAINED,
        cuda=False, cache=False, verbose=False, save_cpu_ram=True)["frechet_inception_distance"]
    assert out["fid"] == pytest.approx(public, rel=1e-4)
    noise = compute_metrics(files["noise"], files["ref"], feature_extractor=TRAINED, isc=False, kid=False, cuda=False)
    assert noise["fid"] > 10 * out["fid"] > 0


def test_fid_of_a_set_with_itself_is_zero(trained, files, tmp_path):
    ref = compute_reference_statistics(files["test"], tmp_path / "ref_test.npz", feature_extractor=TRAINED, cuda=False)
    out = compute_metrics(files["test"], ref, feature_extractor=TRAINED, isc=False, kid=False, cuda=False)
    trace = np.trace(load_reference_statistics(ref)[1])
    assert abs(out["fid"]) < 1e-6 * trace


def test_isc_kid_prc(trained, files):
    fast = dict(feature_extractor=TRAINED, cuda=False, kid_subsets=10, kid_subset_size=300)
    same = compute_metrics(files["test"], files["ref"], reference_images=files["test"], isc=False, kid=False, prc=True, **fast)
    assert same["precision"] == 1.0 and same["recall"] == 1.0  # every point lies in its own k-NN ball
    assert same["num_reference_images"] == 359
    out = compute_metrics(files["test"], files["ref"], reference_images=files["train"], isc=True, kid=True, prc=True, **fast)
    assert 1.0 < out["isc_mean"] <= 10.0 and out["isc_std"] >= 0  # IS is bounded by the 10 classes
    assert out["precision"] > 0.8 and out["recall"] > 0.8
    far = compute_metrics(files["noise"], files["ref"], reference_images=files["train"], isc=True, kid=True, prc=True, **fast)
    assert abs(out["kid_mean"]) < 0.05 * far["kid_mean"]
    assert far["recall"] < 0.5 and far["isc_mean"] < out["isc_mean"]
    with pytest.warns(UserWarning, match="reference_images"):
        bare = compute_metrics(files["test"], files["ref"], kid=True, prc=True, **fast)
    # KID from the features fid-ref stored with its statistics: the same as from the train images
    assert bare["kid_mean"] == pytest.approx(out["kid_mean"], rel=1e-6, abs=1e-9)
    assert bare["kid_std"] == pytest.approx(out["kid_std"], rel=1e-6, abs=1e-9)
    assert not {"precision", "recall"} & set(bare)
    assert bare["isc_mean"] == pytest.approx(out["isc_mean"], rel=1e-9)


def test_kid_without_stored_reference_features(trained, files, tmp_path):
    """A reference file written before the features were stored (or ADM's batch): KID needs the
    reference images, and is skipped with a warning without them."""
    fast = dict(feature_extractor=TRAINED, cuda=False, isc=False, kid_subsets=10, kid_subset_size=300)
    with np.load(files["ref"]) as npz:
        assert npz["features"].shape == (int(npz["num_images"]), 32)
        old = {k: npz[k] for k in npz.files if k != "features"}
    np.savez(tmp_path / "old_ref.npz", **old)
    assert fid.load_reference_features(tmp_path / "old_ref.npz") is None
    with pytest.warns(UserWarning, match="reference_images"):
        bare = compute_metrics(files["test"], tmp_path / "old_ref.npz", kid=True, **fast)
    assert "kid_mean" not in bare
    again = compute_metrics(files["test"], tmp_path / "old_ref.npz", reference_images=files["train"], kid=True, **fast)
    stored = compute_metrics(files["test"], files["ref"], kid=True, **fast)
    assert again["kid_mean"] == pytest.approx(stored["kid_mean"], rel=1e-6, abs=1e-9)


def test_reference_statistics_computed_once(trained, files, tmp_path):
    ckpt, _ = trained
    mtime = files["ref"].stat().st_mtime_ns
    again = compute_reference_statistics(files["train"], files["ref"], feature_extractor=TRAINED, cuda=False)
    assert again == files["ref"] and files["ref"].stat().st_mtime_ns == mtime
    register_classifier_extractor(write_random_classifier(tmp_path / "rand.pt"), RANDOM)
    with pytest.raises(ValueError, match="overwrite"):
        compute_reference_statistics(files["train"], files["ref"], feature_extractor=RANDOM, cuda=False)
    # Statistics of one extractor are refused for metrics with another.
    with pytest.raises(ValueError, match="same extractor"):
        compute_metrics(files["test"], files["ref"], feature_extractor=RANDOM, cuda=False)


def test_adm_reference_batch_loads_and_is_used(trained, files, tmp_path):
    ckpt, _ = trained
    train_feats = direct_features(ckpt, digits_uint8("train")[0])
    mu, sigma = stats(train_feats)
    adm = tmp_path / "VIRTUAL_like.npz"
    # ADM's reference batch layout: images (arr_0), pool3 mu/sigma and the sFID mu_s/sigma_s; no extractor name.
    np.savez(adm, arr_0=digits_uint8("train")[0][:10], mu=mu, sigma=sigma, mu_s=mu[:7], sigma_s=sigma[:7, :7])
    m, s = load_reference_statistics(adm)
    assert m.dtype == np.float64 and np.array_equal(m, mu) and np.array_equal(s, sigma)
    out = compute_metrics(files["test"], adm, feature_extractor=TRAINED, isc=False, kid=False, cuda=False)
    direct = frechet_distance(*stats(direct_features(ckpt, digits_uint8("test")[0])), mu, sigma)
    assert out["fid"] == pytest.approx(direct, rel=1e-4)
    wrong_dim = tmp_path / "adm2048.npz"
    np.savez(wrong_dim, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match="dimension mismatch"):
        compute_metrics(files["test"], wrong_dim, feature_extractor=TRAINED, isc=False, kid=False, cuda=False)
    np.savez(tmp_path / "nostats.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(KeyError, match="mu"):
        load_reference_statistics(tmp_path / "nostats.npz")
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled"):
        load_reference_statistics(tmp_path / "absent.npz")


# ------------------------------------------------------------------------------------------------ errors


def test_missing_inception_weights_names_the_path(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):  # no network in tests, whatever the machine has
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(FeatureExtractorWeightsError) as info:
        compute_metrics(files["test"], ref, feature_extractor="inception-v3-compat", kid=False, cuda=False)
    msg = str(info.value)
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in msg
    assert "eval.feature_extractor_weights_path" in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(FeatureExtractorWeightsError, match="nowhere.pth"):
        compute_reference_statistics(files["test"], tmp_path / "r.npz", feature_extractor="inception-v3-compat",
                                     feature_extractor_weights_path=tmp_path / "nowhere.pth", cuda=False)


def test_extractor_registration_rules(trained, files, tmp_path):
    with pytest.raises(ValueError, match="taken"):
        register_classifier_extractor(trained[0], "inception-v3-compat")
    with pytest.raises(ValueError, match="register_classifier_extractor"):
        compute_metrics(files["test"], files["ref"], feature_extractor="not-registered", cuda=False)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        register_classifier_extractor(tmp_path / "missing.pt", "simflow-test-missing")
    # Registering a name again re-points it at the new checkpoint: the statistics change accordingly.
    name = "simflow-test-repoint"
    register_classifier_extractor(write_random_classifier(tmp_path / "a.pt", seed=1), name)
    a = compute_reference_statistics(files["test"], tmp_path / "a.npz", feature_extractor=name, cuda=False)
    register_classifier_extractor(write_random_classifier(tmp_path / "b.pt", seed=2), name)
    b = compute_reference_statistics(files["test"], tmp_path / "b.npz", feature_extractor=name, cuda=False)
    assert not np.allclose(load_reference_statistics(a)[0], load_reference_statistics(b)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
def test_cuda_requested_without_gpu(files):
    with pytest.raises(ValueError, match="cuda=False"):
        compute_metrics(files["test"], files["ref"], feature_extractor=TRAINED, cuda=True)


# ------------------------------------------------------------------------------------------------ REPA tokens


def test_classifier_patch_tokens(trained):
    ckpt, _ = trained
    enc = classifier_patch_tokens(ckpt)
    x = build_dataset("digits", None, "test", 16).images[:5].clone().requires_grad_(True)
    tokens = enc(x)
    assert tokens.shape == (5, 16, 32) and enc.num_patches == 16 and enc.embed_dim == 32  # (16/4)^2 tokens of 4*width
    assert not tokens.requires_grad
    fmap = load_classifier(ckpt).patch_map(x.detach())
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))
    torch.testing.assert_close(enc(x.detach().expand(-1, 3, -1, -1)), tokens)  # RGB-repeated input is accepted
    coarse = classifier_patch_tokens(ckpt, grid_size=2)
    assert coarse(x).shape == (5, 4, 32) and coarse.num_patches == 4
    torch.testing.assert_close(coarse(x)[:, 0], fmap[:, :, :2, :2].mean(dim=(2, 3)))
    enc.train()
    assert not enc.training and not enc.classifier.training
    assert enc(torch.zeros(2, 1, 32, 32)).shape == (2, 16, 32)  # other sizes are resized to the classifier's


def test_stored_reference_features_are_capped_for_kid(trained, files, tmp_path, monkeypatch):
    """A large reference set keeps a seeded subset of its per-image features (KID averages small
    subsets), while mu/sigma use every image."""
    monkeypatch.setattr(fid, "KID_REFERENCE_FEATURES", 100)
    ref = compute_reference_statistics(files["test"], tmp_path / "capped.npz", feature_extractor=TRAINED, cuda=False)
    with np.load(ref) as npz:
        assert npz["features"].shape == (100, 32) and int(npz["num_images"]) == 359
        feats = npz["features"]
    direct = direct_features(trained[0], np.load(files["test"])["arr_0"]).astype(np.float32)
    # the kept rows are real images' features, in their original order
    rows = [int(np.argmin(np.abs(direct - f).sum(1))) for f in feats]
    assert rows == sorted(rows) and len(set(rows)) == 100
    np.testing.assert_allclose(feats, direct[rows], rtol=1e-4, atol=1e-5)
    mu, _ = load_reference_statistics(ref)
    np.testing.assert_allclose(mu, direct.mean(0), rtol=1e-4, atol=1e-5)
