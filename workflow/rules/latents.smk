# Encode once: create the cache, fill shard-aligned regions in parallel jobs, validate. The
# store (latent_store) holds only zarr's files: each rule's output is a file beside it (the
# `.init` flag, one `.done` per part, the gather report), the store a parameter.
PARTS = range(config["latents"]["parts"])


rule encode_init:
    input:
        ae=AE_CHECKPOINT,
        shards=rules.shard.output.manifest,
    output:
        touch(f"{latent_store('{split}')}.init"),
    log:
        f"{LOGS}/encode_init_{{split}}.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("device", "latents"),
        shards=shard_folder,
        store=store_of,
    shell:
        "dinosae encode-init --cfg {params.cfg} --shards {params.shards:q}"
        " --checkpoint {input.ae:q} --out {params.store:q} > {log:q} 2>&1"


rule encode_part:
    input:
        init=rules.encode_init.output,
        ae=AE_CHECKPOINT,
        shards=rules.shard.output.manifest,
    output:
        "results/latents/{split}.parts/{i}.done",
    log:
        f"{LOGS}/encode_part_{{split}}_{{i}}.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("device", "latents"),
        parts=config["latents"]["parts"],
        shards=shard_folder,
        store=store_of,
    shell:
        "dinosae encode-part --cfg {params.cfg} --cache {params.store:q}"
        " --shards {params.shards:q} --checkpoint {input.ae:q} --index {wildcards.i:q}"
        " --parts {params.parts:q} --done {output:q} > {log:q} 2>&1"


rule encode:
    input:
        parts=expand(rules.encode_part.output[0], i=PARTS, allow_missing=True),
    output:
        report="results/latents/{split}.report.json",
    log:
        f"{LOGS}/encode_{{split}}.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("latents"),
        store=store_of,
    shell:
        "dinosae encode-gather --cfg {params.cfg} --cache {params.store:q} --out {output:q} > {log:q} 2>&1"
