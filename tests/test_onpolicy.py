"""On-policy distillation: DMD maths, the update schedule, which weights move, resume, DDP agreement."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg, fast_overrides, run_cli

from anyflow.objectives import dmd_gradient, dmd_loss, gan_discriminator_loss, gan_generator_loss
from anyflow.objectives.dmd import dmd_generator_loss
from anyflow.train import build_module, train


def test_dmd_gradient_and_loss_by_hand():
    x0_hat = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    fake = torch.tensor([[1.5, 2.0], [0.5, -1.0]])
    real = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    # per-sample normaliser: mean|x̂ − real| = (1 + 1)/2 = 1 and (0 + 2)/2 = 1 → g = fake − real
    g = dmd_gradient(x0_hat, fake, real)
    assert g.dtype == torch.float64
    assert torch.allclose(g, torch.tensor([[1.5, 1.0], [0.5, -2.0]], dtype=torch.float64))
    x = x0_hat.clone().requires_grad_()
    loss = dmd_loss(x, fake, real, weight=0.5)
    # MSE(x̂, x̂ − g) = mean(g²) = (2.25 + 1 + 0.25 + 4)/4
    assert loss.item() == pytest.approx(0.5 * 7.5 / 4)
    loss.backward()
    assert torch.allclose(x.grad.double(), 2 * 0.5 * g / 4)  # ∂loss/∂x̂ = 2·w·g/N


def test_dmd_normaliser_and_nan_to_num():
    x0_hat = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    real = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # second sample: normaliser 0
    fake = torch.tensor([[1.0, -1.0], [1.0, 1.0]])
    g = dmd_gradient(x0_hat, fake, real)
    assert torch.allclose(g[0], torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert torch.equal(g[1], torch.zeros(2, dtype=torch.float64))  # 0/0 → 0


class Const(torch.nn.Module):
    """A velocity model with a fixed answer for the condition and for the negative prompt (mean 0)."""

    def __init__(self, cond: float, uncond: float):
        super().__init__()
        self.cond, self.uncond = cond, uncond

    def forward(self, hidden_states, timestep, r_timestep, encoder_hidden_states, return_dict=True, **_):
        is_cond = encoder_hidden_states.abs().flatten(1).sum(1) > 0
        value = torch.where(is_cond, torch.tensor(self.cond), torch.tensor(self.uncond)).view(-1, 1, 1, 1, 1)
        return (torch.zeros_like(hidden_states) + value,)


def test_dmd_generator_loss_uses_cfg_form_cond_plus_s_times_difference():
    x0_hat = torch.full((1, 1, 1, 1, 2), 0.5, requires_grad=True)
    noise = torch.zeros(1, 1, 1, 1, 2)
    t = torch.tensor([0.5])
    embeds, negative = torch.ones(1, 2, 3), torch.zeros(1, 2, 3)
    out = dmd_generator_loss(x0_hat, Const(cond=1.0, uncond=0.0), Const(cond=2.0, uncond=0.0), embeds,
                             negative_embeds=negative, t=t, noise=noise, real_guidance_scale=3.0)
    x_t = 0.5 * 0.5
    real_v = 1.0 + 3.0 * (1.0 - 0.0)  # cond + s·(cond − uncond) = 4
    x0_real, x0_fake = x_t - 0.5 * real_v, x_t - 0.5 * 2.0
    g = (x0_fake - x0_real) / abs(0.5 - x0_real)
    assert out["g"].flatten().tolist() == pytest.approx([g, g])
    assert out["loss"].item() == pytest.approx(g**2)


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    sp = torch.nn.functional.softplus
    assert gan_generator_loss(fake).item() == pytest.approx(sp(-fake).mean().item())
    assert gan_discriminator_loss(real, fake).item() == pytest.approx((sp(-real).mean() + sp(fake).mean()).item())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A teacher export and a pretrain export of the tiny toy, a few iterations each."""
    tmp = tmp_path_factory.mktemp("onpolicy")
    for stage in ("teacher", "pretrain"):
        train(compose_cfg("train", fast_overrides(tmp, stage, "trainer.max_steps=2"),
                          run_dir=tmp / "outputs" / stage / "run"))
    return tmp


def _onpolicy(tmp, name, *extra):
    return compose_cfg("train", fast_overrides(tmp, "onpolicy", "stage.rollout_nfe=[1,2,4]", *extra),
                       run_dir=tmp / "outputs" / "onpolicy" / name)


def _snapshot(module):
    return {name: {k: v.detach().clone() for k, v in getattr(module, name).state_dict().items()}
            for name in ("student", "teacher", "fake_score", "discriminator", "ema")
            if getattr(module, name) is not None}


def _changed(before, after):
    return {name: any(not torch.equal(before[name][k], after[name][k]) for k in before[name]) for name in before}


def test_onpolicy_updates_the_right_networks(pretrained):
    import lightning as L

    from anyflow.data import AnyFlowDataModule
    from anyflow.data.shapes import ShapesDataset

    cfg = _onpolicy(pretrained, "unit", "stage.gan_weight=0.03", "stage.generator_every=3",
                    "stage.discriminator.feature_blocks=[0]")
    module = build_module(cfg)
    assert module.discriminator is not None and module.teacher is not None
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert all(p.requires_grad for p in module.fake_score.parameters())
    counts = {"critic": 0, "generator": 0}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = _snapshot(pl_module)
            assert not pl_module.teacher.training and pl_module.fake_score.training

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            changed = _changed(self.before, _snapshot(pl_module))
            assert not changed["teacher"]
            assert all(p.grad is None for p in pl_module.teacher.parameters())  # no gradient reaches it
            generator = pl_module.is_generator_iteration(trainer.global_step - 1)
            counts["generator" if generator else "critic"] += 1
            assert changed["student"] == generator and changed["ema"] == generator
            assert changed["fake_score"] == (not generator) and changed["discriminator"] == (not generator)

    data = AnyFlowDataModule(ShapesDataset(frames=4, size=8), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[Watch()], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert counts == {"critic": 6, "generator": 2}  # 3 critic updates, then 1 generator update, twice
    assert trainer.global_step == 8  # one optimizer step per iteration


def test_onpolicy_resume_bit_identical(pretrained):
    full = train(_onpolicy(pretrained, "full", "trainer.max_steps=4"))
    train(_onpolicy(pretrained, "half", "trainer.max_steps=2"))
    half = pretrained / "outputs" / "onpolicy" / "half" / "checkpoints" / "last.ckpt"
    resumed = train(_onpolicy(pretrained, "resumed", "trainer.max_steps=4", f"ckpt_path={half}"))
    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert not any(k.startswith("teacher.") for k in a["state_dict"])  # frozen: rebuilt, not stored
    assert any(k.startswith("fake_score.") for k in a["state_dict"])


def test_onpolicy_needs_a_teacher(tmp_path, pretrained):
    export = pretrained / "outputs" / "pretrain" / "run" / "export"
    cfg = compose_cfg("train", fast_overrides(tmp_path, "onpolicy", f"init_from={export}"), run_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="stage=onpolicy needs a teacher"):
        train(cfg)


@pytest.mark.slow
def test_onpolicy_ddp_ranks_agree_on_rollout(pretrained):
    """2 CPU processes (gloo): draw_rollout all-gathers (nfe, split) and asserts that the ranks agree."""
    out = pretrained / "outputs" / "onpolicy" / "ddp"
    result = run_cli("train.py", *fast_overrides(pretrained, "onpolicy", "trainer=ddp", "trainer.accelerator=cpu",
                                                 "trainer.devices=2", "trainer.max_steps=4", "logger=csv",
                                                 "trainer.log_every_n_steps=1",
                                                 "stage.rollout_nfe=[1,2,4,8]",
                                                 "+callbacks.dump._target_=stubs.DumpTrainable",
                                                 f"+callbacks.dump.dirpath={pretrained}"), f"hydra.run.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    # gradients were averaged across ranks: both hold the same student, fake score and EMA
    rank0, rank1 = (torch.load(pretrained / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.startswith("fake_score.") for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    import csv

    rows = list(csv.DictReader(open(next(out.glob("logs/version_*/metrics.csv")))))
    assert {r["train/rollout_nfe"] for r in rows if r.get("train/rollout_nfe")} <= {"1.0", "2.0", "4.0", "8.0"}
    assert any(r.get("train/dmd_loss") for r in rows) and any(r.get("train/fake_score_loss") for r in rows)
