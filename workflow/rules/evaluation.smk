# Reference statistics, then FID/sFID/IS/precision/recall (or FD in the configured extractor).
# The reference: ADM's reference batch when eval.adm_reference names it (ImageNet-train
# statistics, as RAE, LightningDiT and REPA-E report), else the split eval.reference names,
# made here from its shards (reference_<split>.npz, so a val reference is never mistaken for
# the field's train one).

ADM_REFERENCE = config["eval"].get("adm_reference")
REFERENCE_SPLIT = config["eval"]["reference"]


rule fid_reference:
    input:
        shards=(
            []
            if ADM_REFERENCE
            else expand(rules.shard.output.manifest, split=REFERENCE_SPLIT)
        ),
        adm=[ADM_REFERENCE] if ADM_REFERENCE else [],
        ae=TEACHER_AE,
    output:
        (
            "results/fid/reference_adm.npz"
            if ADM_REFERENCE
            else f"results/fid/reference_{REFERENCE_SPLIT}.npz"
        ),
    log:
        f"{LOGS}/fid_reference.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("device", "autoencoder", "eval"),
        shards=reference_shards,
    shell:
        "dinosae fid-reference --cfg {params.cfg} {params.shards} --ae {input.ae:q}"
        " --out {output:q} > {log:q} 2>&1"


rule fid:
    input:
        samples=SAMPLES,
        reference=rules.fid_reference.output,
        ae=TEACHER_AE,
    output:
        "results/gfid.txt",
    log:
        f"{LOGS}/fid.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("device", "autoencoder", "eval"),
    shell:
        "dinosae fid --cfg {params.cfg} --samples {input.samples:q} --reference {input.reference:q}"
        " --ae {input.ae:q} --out {output:q} > {log:q} 2>&1"
