"""Several teachers: heterogeneous teachers in every weighting mode, the confidence weights by hand, EXP3 by its
formula, a bit-exact resume of the adaptive policy, fused pseudo labels by hand, and the config errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model, tiny_recipe, two_image_batch

from detkd.config import ConfigError, config_from_dict, load_config
from detkd.distiller import Distiller, LossSpec, TeacherSpec
from detkd.engine.checkpoint import load_checkpoint
from detkd.engine.runner import train_distill
from detkd.losses import HEAD_LOSSES, build_feature_loss
from detkd.models.build import build_detector
from detkd.teachers import (
    Exp3Policy,
    TeacherWeighting,
    draw_arm,
    exp3_probabilities,
    exp3_update,
    fuse_detections,
    improvement_reward,
    nms_fusion,
    teacher_subsets,
    weighted_box_fusion,
)

NUM_CLASSES = 4


def detector(arch: str, fpn: int, seed: int, norm: str = "bn"):
    torch.manual_seed(seed)
    return build_detector(arch, "resnet18", NUM_CLASSES, fpn_channels=fpn, min_size=64, max_size=64, norm=norm)


def two_teachers(norm: str = "bn") -> list[TeacherSpec]:
    """A RetinaNet (FPN 32) and an FCOS (FPN 24) teacher: different families and widths."""
    return [
        TeacherSpec("retina", detector("retinanet", 32, 0, norm), weight=2.0),
        TeacherSpec("fcos", detector("fcos", 24, 1, norm), weight=1.0),
    ]


def make(mode: str, norm: str = "bn", **kwargs) -> Distiller:
    feats = [
        LossSpec("mse", build_feature_loss("mse"), 1.0, ("p3", "p4")),
        LossSpec("fgd", build_feature_loss("fgd"), 1.0, ("p3",)),  # learnable GcBlocks: one set per teacher
    ]
    weighting = TeacherWeighting(mode, temperature=0.5, interval=1)
    return Distiller(two_teachers(norm), detector("retinanet", 16, 2), feats, probe_size=64, weighting=weighting,
                     **kwargs).train()  # fmt: skip


EXPECTED_TERMS = {f"distill/mse/{t}/{lvl}" for t in ("retina", "fcos") for lvl in ("p3", "p4")} | {
    f"distill/fgd/{t}/p3" for t in ("retina", "fcos")
}


@pytest.mark.parametrize("mode", ["fixed", "confidence", "adaptive"])
def test_two_heterogeneous_teachers_train_two_steps_in_each_weighting_mode(mode):
    d = make(mode)
    images, targets = two_image_batch()
    if mode == "adaptive":
        d.set_holdout(images[:1], targets[:1])
    frozen = {s.name: {k: v.clone() for k, v in s.model.state_dict().items()} for s in d.slots}
    student_before = d.student.head.classification_head.cls_logits.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        losses = d(images, targets)
        assert EXPECTED_TERMS <= set(losses), sorted(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    weights = [d.log_scalars[f"teachers/weight/{n}"] for n in ("retina", "fcos")]
    assert sum(weights) == pytest.approx(1.0)
    if mode == "fixed":
        assert weights == pytest.approx([2 / 3, 1 / 3])
    if mode == "adaptive":
        assert {"teachers/bandit/arm", "teachers/bandit/reward", "teachers/bandit/holdout_loss"} <= set(d.log_scalars)
        assert [e["round"] for e in d.bandit_events] == [0, 1] and "reward" in d.bandit_events[1]
    for slot in d.slots:  # frozen teachers: not one parameter or statistic moved, no gradient
        assert all(p.grad is None for p in slot.model.parameters()) and not slot.model.training
        for k, v in slot.model.state_dict().items():
            assert torch.equal(v, frozen[slot.name][k]), (slot.name, k)
    assert not torch.equal(student_before, d.student.head.classification_head.cls_logits.weight)
    # per-teacher parts are nested under the teacher's name; the FGD blocks have each teacher's width
    state = d.trainable_state_dict()
    assert state["adapters.retina.p3.weight"].shape[0] == 32 and state["adapters.fcos.p3.weight"].shape[0] == 24
    assert any(k.startswith("feature_loss_modules.fcos.1.") for k in state)


def test_confidence_weights_are_the_softmax_of_each_teachers_own_loss_per_image():
    # frozen BatchNorm: each teacher's training-mode loss on one image alone is computed by the teacher itself
    d = make("confidence", norm="frozen_bn")
    images, targets = two_image_batch()
    records, _ = d.record_teachers(images, targets)
    weights = d.teacher_weights(records)
    temperature = 0.5
    by_hand = []
    for i in range(2):
        own = []
        for slot in d.slots:
            slot.model.train()
            with torch.no_grad():
                own.append(float(sum(slot.model([images[i]], [targets[i]]).values())))
            slot.model.eval()
        z = [math.exp(-loss / temperature) for loss in own]
        by_hand.append([v / sum(z) for v in z])
    for k, name in enumerate(("retina", "fcos")):
        for i in range(2):
            assert float(weights[name][i]) == pytest.approx(by_hand[i][k], rel=1e-4, abs=1e-6)
        assert d.log_scalars[f"teachers/weight/{name}"] == pytest.approx((by_hand[0][k] + by_hand[1][k]) / 2, rel=1e-4)
    # a term is the per-image weighted mean: (1/N) sum_i w_i mse(adapter(s_i), t_i)
    losses = d.compute_losses(records, weights=weights)
    for k, slot in enumerate(d.slots):
        record = records[slot.name]
        s, t = record.student.features["p3"], record.teacher.features["p3"]
        per_image = [((slot.adapter("p3")(s[i : i + 1]) - t[i : i + 1]) ** 2).mean() for i in range(2)]
        expected = sum(by_hand[i][k] * per_image[i] for i in range(2)) / 2
        assert float(losses[f"distill/mse/{slot.name}/p3"].detach()) == pytest.approx(
            float(expected.detach()), rel=1e-4
        )


def test_exp3_follows_its_formula():
    assert teacher_subsets(2) == [(0,), (1,), (0, 1)]
    log_w = torch.tensor([0.0, math.log(2.0), 0.0], dtype=torch.float64)
    gamma = 0.3
    probs = exp3_probabilities(log_w, gamma)
    expected = [(1 - gamma) * w / 4 + gamma / 3 for w in (1.0, 2.0, 1.0)]
    assert probs.tolist() == pytest.approx(expected)
    # w_arm <- w_arm * exp(gamma * x / (p_arm * A)); the others unchanged (up to the common shift)
    new = exp3_update(log_w, 2, 0.8, expected[2], gamma)
    w = [1.0, 2.0, 1.0 * math.exp(gamma * 0.8 / (expected[2] * 3))]
    assert (new - new[0]).exp().tolist() == pytest.approx(w)
    assert improvement_reward(1.0, 0.98, 0.05) == pytest.approx(0.7)  # 2 % better, scale 5 %: 0.5 + 0.5 * 0.4
    assert improvement_reward(1.0, 1.2, 0.05) == 0.0 and improvement_reward(1.0, 0.5, 0.05) == 1.0
    assert draw_arm(probs, 3, 7) == draw_arm(probs, 3, 7)  # a round's draw is a function of (seed, round)

    policy = Exp3Policy(2, interval=2, gamma=gamma, reward_scale=0.05, seed=0)
    held = iter([1.0, 0.98])
    first = policy.begin_step(lambda: next(held))
    assert first["holdout_loss"] == 1.0 and "reward" not in first
    arm, p = first["arm"], float(policy.prob)
    assert p == pytest.approx(1 / 3) and policy.followed() == [k in teacher_subsets(2)[arm] for k in range(2)]
    assert policy.begin_step(lambda: 1 / 0) is None  # mid-round: no measurement
    second = policy.begin_step(lambda: next(held))
    assert second["reward"] == pytest.approx(0.7) and second["rewarded_arm"] == arm
    after = policy.log_weights - policy.log_weights[(arm + 1) % 3]
    assert float(after[arm]) == pytest.approx(gamma * 0.7 / (p * 3))


def test_fused_pseudo_labels_by_hand():
    a = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    b = {
        "boxes": torch.tensor([[1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]]),
        "scores": torch.tensor([0.6, 0.8, 0.7]),
        "labels": torch.tensor([1, 2, 3]),  # the last one: another class on a's box, never fused with it
    }
    # weights 1:1 -> 0.5 each; v = 0.45 (a), 0.3 / 0.4 / 0.35 (b); IoU(a, b0) = 81 / 119 = 0.68 > 0.55
    wbf = weighted_box_fusion([a, b], [1.0, 1.0], iou=0.55)
    assert wbf["labels"].tolist() == [1, 2, 3]
    assert wbf["scores"].tolist() == pytest.approx([0.75, 0.4, 0.35])
    box = (0.45 * torch.tensor([0.0, 0.0, 10.0, 10.0]) + 0.3 * torch.tensor([1.0, 1.0, 11.0, 11.0])) / 0.75
    assert torch.allclose(wbf["boxes"][0], box) and wbf["boxes"][0].tolist() == pytest.approx([0.4, 0.4, 10.4, 10.4])
    assert torch.equal(wbf["boxes"][1], torch.tensor([50.0, 50.0, 60.0, 60.0]))
    # class-wise NMS across teachers: a's box suppresses b's overlapping box of its class, the rest stay as they are
    nms = nms_fusion([a, b], [1.0, 1.0], iou=0.55)
    assert nms["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7]) and nms["labels"].tolist() == [1, 2, 3]
    assert torch.equal(nms["boxes"][0], a["boxes"][0])
    # weight 3:1 -> v = 0.675 (a), 0.15 (b0): the fused box leans towards a; a weight-0 teacher is left out
    wbf31 = weighted_box_fusion([a, b], [3.0, 1.0], iou=0.55)
    assert wbf31["scores"][0].item() == pytest.approx(0.825)
    assert wbf31["boxes"][0].tolist() == pytest.approx([0.15 / 0.825] * 2 + [10 + 0.15 / 0.825] * 2)
    only_a = fuse_detections([[a], [b]], [1.0, 0.0], "wbf")
    assert only_a[0]["scores"].tolist() == pytest.approx([0.9])


def test_pseudo_labels_of_two_teachers_are_fused_before_the_filter():
    pl = HEAD_LOSSES["pseudo_label"](score_thr=0.0, max_dets=5)
    pl.set_category_map({1: 1, 2: 2, 3: 3})
    d = Distiller(two_teachers(), detector("retinanet", 16, 2), [], [LossSpec("pseudo_label", pl, 1.0)],
                  probe_size=64, fusion=("nms", 0.5)).train()  # fmt: skip
    seen = []
    original = pl.make_targets
    pl.make_targets = lambda dets, targets: (seen.append(dets), original(dets, targets))[1]
    images, targets = two_image_batch()
    d(images, targets)
    singles = [d._teacher_detections(images, slot)[0] for slot in d.slots]
    assert len(seen) == 1 and len(seen[0]) == 2
    for i in range(2):  # the fused set has no more boxes than both teachers together, and is non-empty
        fused = seen[0][i]["boxes"].shape[0]
        assert 0 < fused <= sum(s[i]["boxes"].shape[0] for s in singles)


# ----------------------------------------------------------------------------------------------------------------
# Recipes: an adaptive run resumes bit-exactly; config errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ckpts(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, (arch, fpn) in {"retina": ("retinanet", 32), "fcos": ("fcos", 24)}.items():
        torch.manual_seed(len(name))
        model = build_detector(arch, "resnet18", 9, fpn_channels=fpn, min_size=64, max_size=64)
        out[name] = str(folder / f"{name}.pth")
        torch.save({"model": model.state_dict()}, out[name])
    return out


def _teachers(ckpts: dict) -> list[dict]:
    return [
        {**tiny_model("retinanet", fpn_channels=32), "name": "retina", "weight": 1.0, "checkpoint": ckpts["retina"]},
        {**tiny_model("fcos", fpn_channels=24), "name": "fcos", "weight": 1.0, "checkpoint": ckpts["fcos"]},
    ]


def _adaptive_recipe(tiny_data, tmp_path, name, ckpts):
    return tiny_recipe(
        tiny_data,
        tmp_path,
        name,
        teachers=_teachers(ckpts),
        student=tiny_model(fpn_channels=16),
        distill={
            "features": [{"type": "pkd"}],
            "teacher_weighting": {"mode": "adaptive", "interval": 2, "holdout_images": 4},
            "teacher_check": {"enabled": False, "num_images": 2},  # untrained teachers: AP ~ 0
        },
        train={"epochs": 2, "device": "cpu", "log_interval": 1, "warmup_iters": 1},
        eval={"interval": 0, "max_images": 2},
    )


def test_an_adaptive_two_teacher_run_resumes_bit_exactly(tiny_data, tmp_path, teacher_ckpts):
    full = load_config(_adaptive_recipe(tiny_data, tmp_path, "adaptive_full", teacher_ckpts))
    cut = load_config(_adaptive_recipe(tiny_data, tmp_path, "adaptive_cut", teacher_ckpts))
    train_distill(full, show_progress=False)
    train_distill(cut, show_progress=False, stop_after_epochs=1)
    train_distill(cut, resume=True, show_progress=False)
    a = load_checkpoint(tmp_path / "work_adaptive_full" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "work_adaptive_cut" / "last.pth")["model"]
    assert a.keys() == b.keys() and {"teacher_policy.log_weights", "teacher_policy.arm"} <= set(a)
    assert int(a["teacher_policy.steps"]) == 10  # 2 epochs of (24 - 4 held out) / 4 batches
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [
        (tmp_path / f"work_adaptive_{n}" / "teacher_bandit.jsonl").read_text().splitlines() for n in ("full", "cut")
    ]
    assert logs[0] == logs[1] and len(logs[0]) == 5  # one record per round of 2 steps, the same choices and rewards
    rounds = [json.loads(line) for line in logs[0]]
    assert all("reward" in r and 0.0 <= r["reward"] <= 1.0 for r in rounds[1:]) and "arm" in rounds[0]
    records = [
        json.loads(line) for line in (tmp_path / "work_adaptive_full" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r.get("type") == "train"]
    assert {"distill/pkd/retina/p3", "distill/pkd/fcos/p3", "teachers/bandit/reward"} <= set(train[-1])
    for name in ("retina", "fcos"):  # the sanity check ran for each teacher
        assert (tmp_path / "work_adaptive_full" / f"teacher_val_{name}.json").is_file()


def _cfg(**sections) -> dict:
    data = {"train": {"ann_file": "x", "img_dir": "y"}, "val": {"ann_file": "x", "img_dir": "y"}}
    return {"data": data, "student": tiny_model(), **sections}


def test_several_teacher_recipes_that_cannot_work_are_config_errors():
    one = {**tiny_model(), "checkpoint": "t.pth"}
    two = [{**one, "name": "a"}, {**one, "name": "b"}]
    cases = [
        ({"teacher": one, "teachers": two}, r"key 'teachers': is given together with 'teacher'"),
        ({"teachers": [{**one, "name": "a"}, {**one, "name": "a"}]}, r"key 'teachers\.1\.name': 'a' is also the name"),
        ({"teachers": [one]}, r"missing required key 'teachers\.0\.name'"),
        ({"teachers": [{**one, "name": "a.b"}]}, r"key 'teachers\.0\.name': must be letters, digits"),
        ({"teachers": two, "distill": {"features": [{"type": "mse", "teachers": ["c"]}]}},
         r"key 'distill\.features\.0\.teachers': names 'c', which is no teacher of this recipe; the teachers are: a"),
        ({"teacher": one, "distill": {"head": [{"type": "logit_kd", "teachers": ["a"]}]}},
         r"key 'distill\.head\.0\.teachers': names 'a'.*the teachers are: teacher"),
        ({"teacher": one, "distill": {"teacher_weighting": {"mode": "confidence"}}},
         r"key 'distill\.teacher_weighting\.mode': is 'confidence', which combines several teachers"),
        ({"teachers": two, "distill": {"mutual": True}}, r"key 'distill\.mutual': is true, but no teacher has mode"),
        ({"teachers": [{**t, "weight": 0.0} for t in two]}, r"key 'teachers': the teachers' weights sum to 0"),
    ]  # fmt: skip
    for sections, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_cfg(**sections))
    ok = config_from_dict(_cfg(teachers=two, distill={"features": [{"type": "mse", "teachers": ["b"]}]}))
    assert [t.name for t in ok.teachers] == ["a", "b"] and ok.distill.features[0].teachers == ("b",)


def test_a_loss_may_select_its_teachers(tmp_path):
    feats = [LossSpec("mse", build_feature_loss("mse"), 1.0, ("p3",), teachers=("fcos",)),
             LossSpec("pkd", build_feature_loss("pkd"), 1.0, ("p4",))]  # fmt: skip
    d = Distiller(two_teachers(), detector("retinanet", 16, 2), feats, probe_size=64).train()
    losses = d(*two_image_batch())
    terms = {k for k in losses if k.startswith("distill/")}
    assert terms == {"distill/mse/fcos/p3", "distill/pkd/retina/p4", "distill/pkd/fcos/p4"}
    unknown = [LossSpec("mse", build_feature_loss("mse"), 1.0, ("p3",), teachers=("x",))]
    with pytest.raises(ValueError, match=r"loss 'mse' names teachers \['x'\]"):
        Distiller(two_teachers(), detector("retinanet", 16, 2), unknown, probe_size=64)


def test_confidence_weighting_slices_faster_rcnn_roi_records_image_by_image():
    """Two identical Faster R-CNN teachers are equally confident on every image (weights 1/2), so evaluating roi_kd
    image by image (``StepRecord.image``: each image's ROIs, their logits and deltas, their labels) and averaging
    must give the batch term of ``fixed`` 1:1 weighting: with ``max_rois`` every image keeps the same number of ROIs,
    and the mean of the per-image means is the batch mean."""

    def faster_rcnn(seed: int, fpn: int):
        torch.manual_seed(seed)
        return build_detector("faster_rcnn", "resnet18", NUM_CLASSES, fpn_channels=fpn, min_size=64, max_size=64)

    images, targets = two_image_batch()
    terms = {}
    for mode in ("fixed", "confidence"):
        teachers = [TeacherSpec(name, faster_rcnn(0, 32), weight=1.0) for name in ("a", "b")]
        head = [LossSpec("roi_kd", HEAD_LOSSES["roi_kd"](max_rois=8, box_weight=1.0), 1.0)]
        d = Distiller(teachers, faster_rcnn(1, 16), (), head, probe_size=64,
                      weighting=TeacherWeighting(mode, temperature=1.0)).train()  # fmt: skip
        torch.manual_seed(5)  # the student's proposal sampling draws the same ROIs in both modes
        terms[mode] = {k: v.detach() for k, v in d(images, targets).items() if k.startswith("distill/")}
        if mode == "confidence":
            assert d.log_scalars["teachers/weight/a"] == pytest.approx(0.5)
        if mode == "fixed":  # each image's record holds that image's 8 ROIs, and together they are the batch's
            torch.manual_seed(5)
            record = d.record_teachers(images, targets)[0]["a"]
            parts = [record.image(i) for i in range(len(images))]

            def kept(r, side):
                keep = r.student.roi_keep_flat()
                logits = getattr(r, side).roi_logits
                return logits[keep] if side == "student" and keep is not None else logits

            for side in ("student", "teacher"):
                per_image = [kept(p, side) for p in parts]
                assert [len(x) for x in per_image] == [8, 8]
                assert torch.equal(torch.cat(per_image), kept(record, side))
            labels = [p.roi_labels()[p.student.roi_keep_flat()] for p in parts]
            assert torch.equal(torch.cat(labels), record.roi_labels()[record.student.roi_keep_flat()])
    names = {f"distill/roi_kd/{t}/{part}" for t in ("a", "b") for part in ("cls", "box")}
    assert set(terms["fixed"]) == set(terms["confidence"]) == names
    assert terms["fixed"]["distill/roi_kd/a/box"] > 0  # foreground ROIs were distilled
    for k in names:
        assert torch.allclose(terms["confidence"][k], terms["fixed"][k], rtol=1e-5, atol=1e-7), k
