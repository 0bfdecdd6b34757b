"""The bridges (rlbook_code/bridges.py): every config of ``configs/`` either maps onto TRL's
``GRPOConfig`` and verl's ``ppo_trainer.yaml`` or fails naming what cannot be mapped, and every
key the bridges name exists on the other side (checked against TRL's dataclass and verl's own
Hydra config, composed offline)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from rlbook_code import bridges, config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# What each peer can express, config by config (a change here is a change of the page's tables).
TRL_OK = {"cispo", "drgrpo", "grpo", "gspo"}
VERL_OK = {"cispo", "drgrpo", "grpo", "gspo", "ppo"}


def test_fields_name_real_trainconfig_fields():
    names = {f.name for f in dataclasses.fields(config.TrainConfig)}
    assert [f.rlbook for f in bridges.FIELDS if f.rlbook not in names] == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_config_maps_or_names_what_cannot(path):
    cfg = config.load_config(path)
    for name, fn, ok in [("trl", bridges.trl_grpo_kwargs, TRL_OK), ("verl", bridges.to_verl_overrides, VERL_OK)]:
        if path.stem in ok:
            fn(cfg)
        else:
            with pytest.raises(bridges.BridgeError, match="counterpart|recipe"):
                fn(cfg)


def test_batch_sizes_are_counted_the_peers_way():
    cfg = config.config_from_dict({"prompts_per_step": 16, "group_size": 8, "num_minibatches": 2, "micro_batch_size": 16})
    kw = bridges.trl_grpo_kwargs(cfg)
    assert kw["steps_per_generation"] * kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 128
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == (16, 4)
    o = dict(x.split("=", 1) for x in bridges.to_verl_overrides(cfg))
    assert o["data.train_batch_size"] == "16" and o["actor_rollout_ref.actor.ppo_mini_batch_size"] == "8"
    assert o["actor_rollout_ref.rollout.n"] == "8"


def test_cispo_cap_and_dual_clip_conventions():
    cispo = config.load_config(ROOT / "configs" / "cispo.yaml")
    assert bridges.trl_grpo_kwargs(cispo)["epsilon_high"] == pytest.approx(1 + cispo.clip_eps_high)
    o = dict(x.split("=", 1) for x in bridges.to_verl_overrides(cispo))
    assert o["actor_rollout_ref.actor.clip_ratio_low"] == "1.0"  # no lower clip
    grpo = config.load_config(ROOT / "configs" / "grpo.yaml")
    o = dict(x.split("=", 1) for x in bridges.to_verl_overrides(config.apply_overrides(grpo, dual_clip=3.0)))
    assert o["actor_rollout_ref.actor.clip_ratio_c"] == "3.0"
    assert bridges.trl_grpo_kwargs(config.apply_overrides(grpo, dual_clip=3.0))["delta"] == 3.0


# ----------------------------------------------------------------------------- against the peers
@pytest.mark.parity
@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem in TRL_OK], ids=lambda p: p.stem)
def test_trl_accepts_the_config(path, tmp_path):
    trl = pytest.importorskip("trl")
    names = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    assert [t for f in bridges.FIELDS for t in f.trl if t not in names] == []
    cfg = config.load_config(path)
    args = bridges.to_trl_grpo_config(cfg, str(tmp_path), report_to="none", use_cpu=True)
    kw = bridges.trl_grpo_kwargs(cfg)
    for k, v in kw.items():
        assert getattr(args, k) == v or k == "lr_scheduler_type", k  # TRL stores the schedule as an enum
    assert args.generation_batch_size == cfg.prompts_per_step * cfg.group_size


def _compose(overrides):
    import verl
    from hydra import compose, initialize_config_dir

    d = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=d, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.mark.parity
def test_every_verl_key_exists_in_verls_config():
    pytest.importorskip("verl")
    from omegaconf import OmegaConf

    cfg = _compose([])
    missing = [k for f in bridges.FIELDS for k in f.verl if OmegaConf.select(cfg, k, default="<missing>") == "<missing>"]
    assert missing == []


@pytest.mark.parity
@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem in VERL_OK], ids=lambda p: p.stem)
def test_verl_composes_the_overrides(path):
    pytest.importorskip("verl")
    from omegaconf import OmegaConf

    overrides = bridges.to_verl_overrides(config.load_config(path))
    composed = _compose(overrides)  # Hydra refuses an override of a key that does not exist
    for item in overrides:
        key, value = item.split("=", 1)
        got = OmegaConf.select(composed, key)
        assert str(got).lower().replace(" ", "") == value.lower().replace(" ", "") or float(got) == float(value), item
