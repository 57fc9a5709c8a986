# Encode once: create the cache, fill shard-aligned regions in parallel jobs, validate.
PARTS = range(config["latents"]["parts"])


rule encode_init:
    input:
        ae="results/ae/stage4/checkpoint.pt",
        shards=f"{SHARDS}/{{split}}/manifest.json",
    output:
        directory("results/latents/{split}.zarr"),
    log:
        f"{LOGS}/encode_init_{{split}}.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("device", "latents"),
        shards=shard_folder,
    shell:
        "dinosae encode-init --cfg {params.cfg} --shards {params.shards}"
        " --checkpoint {input.ae} --out {output} > {log} 2>&1"


rule encode_part:
    input:
        cache="results/latents/{split}.zarr",
        ae="results/ae/stage4/checkpoint.pt",
        shards=f"{SHARDS}/{{split}}/manifest.json",
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
    shell:
        "dinosae encode-part --cfg {params.cfg} --cache {input.cache}"
        " --shards {params.shards} --checkpoint {input.ae} --index {wildcards.i}"
        " --parts {params.parts} --done {output} > {log} 2>&1"


rule encode:
    input:
        cache="results/latents/{split}.zarr",
        parts=expand("results/latents/{{split}}.parts/{i}.done", i=PARTS),
    output:
        "results/latents/{split}.report.json",
    log:
        f"{LOGS}/encode_{{split}}.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("latents"),
    shell:
        "dinosae encode-gather --cfg {params.cfg} --cache {input.cache} --out {output} > {log} 2>&1"
