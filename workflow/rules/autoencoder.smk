# The four autoencoder stages (rules ae_stage1 ... ae_stage4), each from the previous stage's
# checkpoint; then reconstruction metrics on the val split.

for k in (1, 2, 3, 4):

    rule:
        name:
            f"ae_stage{k}"
        input:
            shards=expand(rules.shard.output.manifest, split="train"),
            init=getattr(rules, f"ae_stage{k - 1}").output if k > 1 else [],
        output:
            ae_checkpoint(k),
        log:
            f"{LOGS}/ae_stage{k}.log",
        conda:
            "../../envs/dinosae.yaml"
        params:
            cfg=cfg("seed", "device", "data", "autoencoder", "ae_train"),
            stage=k,
            launch=launch,
            shards=shard_folder,
            init=lambda w, input: (
                f"--init {shlex.quote(str(input.init))}" if input.init else ""
            ),
            out=run_folder,
            micro=micro_batch("ae_train.micro_batch"),
        shell:
            "{params.launch} ae-train --cfg {params.cfg} {params.micro} --stage {params.stage:q} --shards {params.shards:q}"
            " {params.init} --out {params.out:q} > {log:q} 2>&1"


rule eval_recon:
    input:
        ae=AE_CHECKPOINT,
        shards=expand(rules.shard.output.manifest, split="val"),
    output:
        "results/recon.txt",
    log:
        f"{LOGS}/eval_recon.log",
    conda:
        "../../envs/dinosae.yaml"
    params:
        cfg=cfg("seed", "device", "autoencoder", "eval"),
        shards=shard_folder,
        micro=micro_batch("eval.batch_size"),
    shell:
        "dinosae eval-recon --cfg {params.cfg} {params.micro} --checkpoint {input.ae:q} --shards {params.shards:q}"
        " --out {output:q} > {log:q} 2>&1"


# Released weights instead of training (autoencoder.pretrained, e.g. the authors' DINO-SAE): one
# import job writes the stage-4 checkpoint and no training stage runs.
if PRETRAINED_AE:

    rule import_autoencoder:
        input:
            [] if PRETRAINED_AE.startswith("hf-hub:") else [PRETRAINED_AE],
        output:
            AE_CHECKPOINT,
        log:
            f"{LOGS}/import_autoencoder.log",
        conda:
            "../../envs/dinosae.yaml"
        params:
            cfg=cfg("data", "autoencoder"),
            source=lambda w, input: shlex.quote(input[0] if input else PRETRAINED_AE),
        shell:
            "dinosae import-ae --cfg {params.cfg} --source {params.source:q} --out {output:q}"
            " > {log:q} 2>&1"

    ruleorder: import_autoencoder > ae_stage4
