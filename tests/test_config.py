"""Config validation: the schema accepts the shipped configs and names the key of any error."""

import copy
import json
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, default_config

from dinosae.config import load_config, validate
from dinosae.errors import ConfigError


def test_shipped_configs_validate():
    validate(default_config())
    paper = yaml.safe_load((ROOT / "workflow/configs/imagenet256.yaml").read_text())
    validate(paper, check_paths=False)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda c: c["data"].update(image_size="big"), "data.image_size"),
        (lambda c: c["data"].update(image_size=40), "data.image_size"),  # not a multiple of 16
        (lambda c: c["ae_train"]["stages"][1].update(lr=-1e-4), "ae_train.stages[1].lr"),
        (lambda c: c["autoencoder"].update(discriminator={"backbone": "dino_vits8"}),
         "autoencoder.discriminator"),  # RAE's discriminator needs its DINO's weights source
        (lambda c: c["dit"].update(betas=[0.9]), "dit.betas"),
        (lambda c: c["autoencoder"]["decoder"].update(blocks=["res"] * 4 + ["conv"]),
         "autoencoder.decoder.blocks[4]"),
        (lambda c: c["sample"].pop("steps"), "sample"),
    ],
)
def test_bad_value_names_key(edit, key):
    cfg = copy.deepcopy(default_config())
    edit(cfg)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert f"'{key}'" in str(e.value)


def test_unknown_key_is_named():
    cfg = default_config()
    cfg["dit"]["stepz"] = 10
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' in 'dit'"):
        validate(cfg)
    cfg = default_config()
    cfg["extra_section"] = {}
    with pytest.raises(ConfigError, match="unknown key 'extra_section'"):
        validate(cfg)


def test_missing_paths_are_named(tmp_path):
    cfg = default_config()
    cfg["data"].update(source="folder", root=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"'data\.root'.*does not exist"):
        validate(cfg)
    cfg = default_config()
    cfg["eval"]["adm_reference"] = str(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    with pytest.raises(ConfigError, match=r"'eval\.adm_reference'"):
        validate(cfg)
    cfg = default_config()
    cfg["autoencoder"]["teacher"]["weights"] = str(tmp_path / "dinov3.pth")
    with pytest.raises(ConfigError, match=r"'autoencoder\.teacher\.weights'"):
        validate(cfg)


def test_partial_config_and_overrides(tmp_path):
    cfg = load_config(ROOT / "config.yaml", overrides=["dit.steps=7", "sample.s_vae=14.5"])
    assert cfg["dit"]["steps"] == 7 and cfg["sample"]["s_vae"] == 14.5
    # a subset of sections (what a rule passes) validates on its own ...
    part = load_config(cfg_json=json.dumps({"dit": cfg["dit"]}))
    assert set(part) == {"dit"}
    # ... but a section itself must be complete
    with pytest.raises(ConfigError, match="'dit'"):
        load_config(cfg_json='{"dit": {"steps": 3}}')


def test_cli_reports_config_error_with_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "dinosae", "validate-config", "--config", str(ROOT / "config.yaml"),
         "--set", "latents.parts=0"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "'latents.parts'" in r.stderr and "Traceback" not in r.stderr


def test_released_weights_config_and_pretrained_paths(tmp_path):
    released = yaml.safe_load(
        (ROOT / "workflow/configs/imagenet256_released.yaml").read_text())
    validate(released, check_paths=False)
    assert released["autoencoder"]["pretrained"].startswith("hf-hub:")  # not a path to check
    cfg = default_config()
    cfg["autoencoder"]["pretrained"] = str(tmp_path / "dino_sae.pth")
    with pytest.raises(ConfigError, match=r"'autoencoder\.pretrained'.*does not exist"):
        validate(cfg)
    cfg = default_config()
    cfg["dit"]["pretrained"] = str(tmp_path / "dit_export")
    with pytest.raises(ConfigError, match=r"'dit\.pretrained'.*does not exist"):
        validate(cfg)
    cfg["dit"]["pretrained"] = "hf-hub:someone/dit"
    validate(cfg)
    cfg["autoencoder"]["decoder"]["norm"] = "layer"
    with pytest.raises(ConfigError, match=r"'autoencoder\.decoder\.norm'"):
        validate(cfg)


def test_set_indexes_list_entries_and_names_a_bad_index():
    from dinosae.config import set_key

    cfg = copy.deepcopy(default_config())
    set_key(cfg, "ae_train.stages.2.lr", "5.4e-5")
    assert cfg["ae_train"]["stages"][2]["lr"] == 5.4e-5
    assert cfg["ae_train"]["stages"][1]["lr"] == default_config()["ae_train"]["stages"][1]["lr"]
    with pytest.raises(ConfigError, match=r"'7' is not an index of 'ae_train.stages' \(0..3\)"):
        set_key(cfg, "ae_train.stages.7", "{}")
    with pytest.raises(ConfigError, match="'ae_train.stages.9' is not a section"):
        set_key(cfg, "ae_train.stages.9.lr", "1")
