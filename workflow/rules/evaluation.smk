# Reference statistics of real images, then FID/IS (or FD in the configured extractor).


rule fid_reference:
    input:
        shards=expand(rules.shard.output.manifest, split=config["eval"]["reference"]),
        ae=TEACHER_AE,
    output:
        f"results/fid/reference_{config['eval']['reference']}.npz",
    log:
        f"{LOGS}/fid_reference.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("device", "autoencoder", "eval"),
        shards=shard_folder,
    shell:
        "dinosae fid-reference --cfg {params.cfg} --shards {params.shards:q} --ae {input.ae:q}"
        " --out {output:q} > {log:q} 2>&1"


rule fid:
    input:
        samples=rules.sample.output,
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
