# RFM DiT on the latent cache; class-balanced samples decoded by the stage-4 decoder.

# A generator imported instead of trained (dit.pretrained: a dinosae DiT checkpoint or export,
# or a reference generator such as the authors' DDT-XL): no latent cache is needed then.
PRETRAINED_DIT = config["dit"].get("pretrained")


rule train_dit:
    input:
        cache=f"results/latents/{config['latents']['split']}.zarr",
        report=f"results/latents/{config['latents']['split']}.report.json",
        ae="results/ae/stage4/checkpoint.pt",
    output:
        "results/dit/checkpoint.pt",
    log:
        f"{LOGS}/train_dit.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("seed", "device", "dit", "sample"),
        launch=launch,
    shell:
        "{params.launch} train-dit --cfg {params.cfg} --cache {input.cache} --ae {input.ae}"
        " --out results/dit > {log} 2>&1"


rule sample:
    input:
        dit="results/dit/checkpoint.pt",
        ae="results/ae/stage4/checkpoint.pt",
        cache=(
            []
            if PRETRAINED_DIT
            else f"results/latents/{config['latents']['split']}.zarr"
        ),
    output:
        "results/samples/samples.h5",
    log:
        f"{LOGS}/sample.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("seed", "device", "sample"),
        cache=lambda w, input: f"--cache {input.cache}" if input.cache else "",
    shell:
        "dinosae sample --cfg {params.cfg} --dit {input.dit} --ae {input.ae}"
        " {params.cache} --out {output} > {log} 2>&1"


if PRETRAINED_DIT:

    rule import_dit:
        input:
            [] if PRETRAINED_DIT.startswith("hf-hub:") else [PRETRAINED_DIT],
        output:
            "results/dit/checkpoint.pt",
        log:
            f"{LOGS}/import_dit.log",
        conda:
            "../../envs/dinosae.yaml"
        params:
            cfg=cfg("dit"),
            source=lambda w, input: shlex.quote(input[0] if input else PRETRAINED_DIT),
        shell:
            "dinosae import-dit --cfg {params.cfg} --source {params.source} --out {output}"
            " > {log} 2>&1"

    ruleorder: import_dit > train_dit
