# Analysis of the finished study: the per-(variant, seed) metrics and latent statistics become
# results/<study>/summary.csv (one row per variant; per-seed rows in summary_per_seed.csv),
# summary.md (results table and the paper's claims checked) and the figures of the paper.


rule summary:
    input:
        fid=per_unit(stage_file("fid", "metrics", VDIR)),
        reconstruct=per_unit(stage_file("reconstruct", "metrics", VDIR)),
        nll=per_unit(stage_file("nll", "metrics", VDIR)),
        latents=per_unit(stage_file("latents", "latents", VDIR)),
        train=per_unit(stage_file("train", "summary", VDIR)),
        pretrain=pretrain_summaries(),
        floor=stage_file("fid-floor", "metrics", FIDFLOOR_DIR),
    output:
        summary=f"{SD}/summary.csv",
        fid_curves=f"{SD}/fid_curves.csv",
        per_seed=f"{SD}/summary_per_seed.csv",
        latent_stats=f"{SD}/latent_stats.csv",
        noise=f"{SD}/noise_robustness.csv",
        markdown=f"{SD}/summary.md",
        claims=f"{SD}/claims.json",
    params:
        units=summary_units(),
        analysis=STUDY.analysis,
    log:
        f"{LOGS}/summary.log",
    localrule: True
    conda:
        ENV
    script:
        "../scripts/summary.py"


rule figures:
    input:
        per_seed=f"{SD}/summary_per_seed.csv",
        noise=f"{SD}/noise_robustness.csv",
        fid_curves=f"{SD}/fid_curves.csv",
        floor=stage_file("fid-floor", "metrics", FIDFLOOR_DIR),
        interpolation=per_unit(stage_file("reconstruct", "interpolation", VDIR)),
        samples=per_unit(stage_file("sample", "samples", VDIR)),
    output:
        fig2=report(f"{SD}/figures/fig2_gfid_training.png", category="Figures",
                    labels={"figure": "2", "what": "gFID during training, by step and wall-clock"}),
        rate_sweep=report(f"{SD}/figures/fig_rate_sweep.png", category="Figures",
                          labels={"figure": "rate sweep", "what": "rFID, gFID and rate vs the decoder scale"}),
        fig3a=report(f"{SD}/figures/fig3a_noise_robustness.png", category="Figures",
                     labels={"figure": "3a", "what": "PSNR under latent noise"}),
        fig3b=report(f"{SD}/figures/fig3b_interpolations.png", category="Figures",
                     labels={"figure": "3b", "what": "latent interpolations"}),
        fig4=report(f"{SD}/figures/fig4_latent_stats.png", category="Figures",
                    labels={"figure": "4", "what": "latent smoothness statistics"}),
        fig5=report(f"{SD}/figures/fig5_fid.png", category="Figures",
                    labels={"figure": "5", "what": "gFID / rFID per variant and over sigma"}),
        grid=report(f"{SD}/figures/samples_grid.png", category="Figures",
                    labels={"figure": "samples", "what": "generated samples per variant"}),
        pdfs=[f"{SD}/figures/{name}.pdf" for name in FIGURES],
    params:
        units=[[v, s] for v in STUDY.variants for s in STUDY.seeds],
        sweep_reference=STUDY.analysis["sweep_reference"],
        grid_images=STUDY.analysis["grid_images"],
    log:
        f"{LOGS}/figures.log",
    localrule: True
    conda:
        ENV
    script:
        "../scripts/figures.py"


# The CFG sweep of one unit (TarFlow's guided-samples figure): samples per weight and gFID.
rule guidance_figure:
    input:
        metrics=stage_file("guidance", "metrics", VDIR),
        samples=stage_file("guidance", "samples", VDIR),
    output:
        report(GUIDANCE_FIGURE, category="Figures",
               labels={"figure": "guidance {variant} s{seed}", "what": "samples and gFID against the CFG weight"}),
    log:
        f"{VLOG}/guidance_figure.log",
    localrule: True
    conda:
        ENV
    script:
        "../scripts/guidance_figure.py"
