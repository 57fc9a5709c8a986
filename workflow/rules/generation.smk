# RFM DiT on the latent cache; class-balanced samples decoded by the stage-4 decoder.


rule train_dit:
    input:
        latents=(
            f"{SHARED_CACHE}/zarr.json"
            if SHARED_CACHE
            else expand(rules.encode.output.report, split=config["latents"]["split"])
        ),
        ae=AE_CHECKPOINT,
        # the gFID proxy's reference statistics (rules.fid_reference is defined later)
        reference=lambda w: rules.fid_reference.output if GFID_PROXY else [],
    output:
        DIT_CHECKPOINT,
    log:
        f"{LOGS}/train_dit.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("seed", "device", "dit", "sample", *(["eval"] if GFID_PROXY else [])),
        launch=launch,
        cache=CACHE,
        out=run_folder,
        reference=lambda w, input: (
            f"--reference {shlex.quote(str(input.reference))}" if GFID_PROXY else ""
        ),
        micro=micro_batch("dit.micro_batch"),
    shell:
        "{params.launch} train-dit --cfg {params.cfg} {params.micro} --cache {params.cache:q} --ae {input.ae:q}"
        " {params.reference} --out {params.out:q} > {log:q} 2>&1"


# samples.h5 comes from rule sample (one job) or, with sample.parts > 1, from sample_gather:
# consumers name the file, not a rule (ruleorder picks the producer)
SAMPLES = "results/samples/samples.h5"
SAMPLE_PARTS = int(config["sample"].get("parts", 1))


rule sample:
    input:
        dit=DIT_CHECKPOINT,
        ae=AE_CHECKPOINT,
        latents=[] if PRETRAINED_DIT else rules.train_dit.input.latents,
    output:
        SAMPLES,
    log:
        f"{LOGS}/sample.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("seed", "device", "sample"),
        cache="" if PRETRAINED_DIT else f"--cache {shlex.quote(CACHE)}",
        micro=micro_batch("sample.batch_size"),
    shell:
        "dinosae sample --cfg {params.cfg} {params.micro} --dit {input.dit:q} --ae {input.ae:q}"
        " {params.cache} --out {output:q} > {log:q} 2>&1"


# sample.parts > 1: the same samples as K one-GPU jobs of whole batches, gathered into the very
# file rule sample writes (dinosae.generate.gather_parts checks every part first).
if SAMPLE_PARTS > 1:

    rule sample_part:
        input:
            **rules.sample.input,
        output:
            "results/samples/parts/{i}.h5",
        log:
            f"{LOGS}/sample_part_{{i}}.log",
        wildcard_constraints:
            i=r"\d+",
        conda:
            "../../envs/dinosae.yaml"
        params:
            cfg=rules.sample.params.cfg,
            cache=rules.sample.params.cache,
            parts=SAMPLE_PARTS,
            micro=rules.sample.params.micro,
        shell:
            "dinosae sample --cfg {params.cfg} {params.micro} --dit {input.dit:q} --ae {input.ae:q}"
            " {params.cache} --part {wildcards.i}/{params.parts} --out {output:q} > {log:q} 2>&1"

    rule sample_gather:
        input:
            parts=expand(rules.sample_part.output[0], i=range(SAMPLE_PARTS)),
            dit=DIT_CHECKPOINT,
            ae=AE_CHECKPOINT,
        output:
            SAMPLES,
        log:
            f"{LOGS}/sample_gather.log",
        conda:
            "../../envs/dinosae.yaml"
        params:
            cfg=cfg("seed", "sample"),
        shell:
            "dinosae sample-gather --cfg {params.cfg} --parts {input.parts:q}"
            " --dit {input.dit:q} --ae {input.ae:q} --out {output:q} > {log:q} 2>&1"

    ruleorder: sample_gather > sample


# A generator imported instead of trained (dit.pretrained: a dinosae DiT checkpoint or export,
# or a reference generator such as the authors' DDT-XL): no latent cache is needed then.
if PRETRAINED_DIT:

    rule import_dit:
        input:
            [] if PRETRAINED_DIT.startswith("hf-hub:") else [PRETRAINED_DIT],
        output:
            DIT_CHECKPOINT,
        log:
            f"{LOGS}/import_dit.log",
        conda:
            "../../envs/dinosae.yaml"
        params:
            cfg=cfg("dit"),
            source=lambda w, input: shlex.quote(input[0] if input else PRETRAINED_DIT),
        shell:
            "dinosae import-dit --cfg {params.cfg} --source {params.source:q} --out {output:q}"
            " > {log:q} 2>&1"

    ruleorder: import_dit > train_dit
