# What `snakemake --report results/report.html` shows: loss curves and the last reconstruction
# grid of every training stage, per-class sample grids, the results files as tables and the
# config used. The figures are drawn by `dinosae` commands; Snakemake adds runtimes per rule.
# REPORT_FILES (rule all's input) is gathered from the rules' outputs at the end.
REPORT = "results/report"
REPORT_CLASSES = 8  # per-class sample grids, for the first eight classes


# seconds of plotting each: run them where Snakemake runs, not as cluster jobs
localrules:
    report_ae_stage,
    report_dit,
    report_samples,
    report_recon,
    report_gfid,
    report_config,


rule report_ae_stage:
    input:
        ae_checkpoint("{k}"),
    output:
        loss=report(
            f"{REPORT}/ae_stage{{k}}_loss.png",
            caption="../report/loss.rst",
            category="1. Autoencoder",
            subcategory="Stage {k}",
            labels={"figure": "loss curves"},
        ),
        grid=report(
            f"{REPORT}/ae_stage{{k}}_recon.png",
            caption="../report/ae_recon.rst",
            category="1. Autoencoder",
            subcategory="Stage {k}",
            labels={"figure": "input | reconstruction"},
        ),
    log:
        f"{LOGS}/report_ae_stage{{k}}.log",
    wildcard_constraints:
        k="[1-4]",
    conda:
        "../../envs/dinosae.yaml"
    shell:
        "dinosae stage-figures --checkpoint {input:q} --title 'autoencoder stage {wildcards.k}'"
        " --loss {output.loss:q} --grid {output.grid:q} > {log:q} 2>&1"


rule report_dit:
    input:
        DIT_CHECKPOINT,
    output:
        report(
            f"{REPORT}/dit_loss.png",
            caption="../report/loss.rst",
            category="2. Diffusion transformer",
            labels={"figure": "loss curves"},
        ),
    log:
        f"{LOGS}/report_dit.log",
    conda:
        "../../envs/dinosae.yaml"
    shell:
        "dinosae stage-figures --checkpoint {input:q} --title 'DiT (flow matching)'"
        " --loss {output:q} > {log:q} 2>&1"


rule report_samples:
    input:
        SAMPLES,
    output:
        report(
            expand(f"{REPORT}/samples/class_{{j}}.png", j=range(REPORT_CLASSES)),
            caption="../report/samples.rst",
            category="3. Samples",
            subcategory="Per class",
        ),
    log:
        f"{LOGS}/report_samples.log",
    conda:
        "../../envs/dinosae.yaml"
    shell:
        "dinosae sample-grids --samples {input:q} --out {output:q} > {log:q} 2>&1"


rule report_recon:
    input:
        rules.eval_recon.output,
    output:
        report(
            f"{REPORT}/recon.html",
            caption="../report/recon.rst",
            category="4. Metrics",
            labels={"table": "reconstruction"},
        ),
    log:
        f"{LOGS}/report_recon.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        title=lambda w, input: f"Reconstruction ({input})",
    shell:
        "dinosae metrics-table --results {input:q} --title {params.title:q}"
        " --out {output:q} > {log:q} 2>&1"


rule report_gfid:
    input:
        rules.fid.output,
    output:
        report(
            f"{REPORT}/gfid.html",
            caption="../report/gfid.rst",
            category="4. Metrics",
            labels={"table": "generation"},
        ),
    log:
        f"{LOGS}/report_gfid.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        title=lambda w, input: f"Generation ({input})",
    shell:
        "dinosae metrics-table --results {input:q} --title {params.title:q}"
        " --out {output:q} > {log:q} 2>&1"


rule report_config:
    output:
        report(
            f"{REPORT}/config.html",
            caption="../report/config.rst",
            category="5. Configuration",
        ),
    log:
        f"{LOGS}/report_config.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg(*config),
    shell:
        "dinosae config-page --cfg {params.cfg} --out {output:q} > {log:q} 2>&1"


REPORT_FILES = [
    # imported weights (autoencoder.pretrained / dit.pretrained) have no training curves
    *expand(rules.report_ae_stage.output, k=() if PRETRAINED_AE else (1, 2, 3, 4)),
    *([] if PRETRAINED_DIT else rules.report_dit.output),
    *rules.report_samples.output,
    *rules.report_recon.output,
    *rules.report_gfid.output,
    *rules.report_config.output,
]
