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
    params:
        cfg=cfg("device", "latents"),
    shell:
        "dinosae encode-init --cfg {params.cfg} --shards {SHARDS}/{wildcards.split}"
        " --checkpoint {input.ae} --out {output} > {log} 2>&1"


rule encode_part:
    input:
        cache="results/latents/{split}.zarr",
        ae="results/ae/stage4/checkpoint.pt",
    output:
        "results/latents/{split}.parts/{i}.done",
    log:
        f"{LOGS}/encode_part_{{split}}_{{i}}.log",
    params:
        cfg=cfg("device", "latents"),
        parts=config["latents"]["parts"],
    shell:
        "dinosae encode-part --cfg {params.cfg} --cache {input.cache}"
        " --shards {SHARDS}/{wildcards.split} --checkpoint {input.ae} --index {wildcards.i}"
        " --parts {params.parts} --done {output} > {log} 2>&1"


rule encode:
    input:
        cache="results/latents/{split}.zarr",
        parts=expand("results/latents/{{split}}.parts/{i}.done", i=PARTS),
    output:
        "results/latents/{split}.report.json",
    log:
        f"{LOGS}/encode_{{split}}.log",
    params:
        cfg=cfg("latents"),
    shell:
        "dinosae encode-gather --cfg {params.cfg} --cache {input.cache} --out {output} > {log} 2>&1"
