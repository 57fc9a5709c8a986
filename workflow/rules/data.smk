# Images in, webdataset shards out.


if config["data"]["source"] == "mini":

    rule mini_dataset:
        output:
            directory(config["data"]["root"]),
        log:
            f"{LOGS}/mini_dataset.log",
        conda:
            "../../envs/dinosae.yaml"
        params:
            cfg=cfg("seed", "data"),
        shell:
            "dinosae mini-dataset --cfg {params.cfg} --out {output:q} > {log:q} 2>&1"


rule shard:
    input:
        dataset_root(),
    output:
        manifest=f"{SHARDS}/{{split}}/manifest.json",
    log:
        f"{LOGS}/shard_{{split}}.log",
    wildcard_constraints:
        split="train|val",
    conda:
        "../../envs/dinosae.yaml"
    threads: config["data"]["workers"]
    params:
        cfg=cfg("data"),
        out=f"{SHARDS}/{{split}}",
    shell:
        "dinosae shard --cfg {params.cfg} --split {wildcards.split:q} --out {params.out:q} > {log:q} 2>&1"
