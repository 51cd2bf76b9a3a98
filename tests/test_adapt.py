"""The shared self-training loop (`pixcli adapt`) on tiny data."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_warmup

from pixcli.artifacts import load_checkpoint
from pixcli.data.mixing import classmix_masks, match_colour_statistics, mix
from pixcli.data.readers import open_dataset
from pixcli.data.splits import split_labelled
from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.data.training_set import geometry_to_tensor
from pixcli.data.transforms import CropGeometry
from pixcli.engine.self_training import (
    SelfTrainingConfig,
    flip_averaged,
    weak_view_pseudo_labels,
)
from pixcli.errors import UserError
from pixcli.losses.cpsl import CPSLConfig
from pixcli.losses.self_training import (
    ema_momentum,
    ema_update,
    pseudo_labels_and_weights,
    weighted_cross_entropy,
)
from pixcli.methods import METHODS, MethodSetup, StepContext
from pixcli.models import SegOutput
from pixcli.pseudo_labels import PseudoLabelFile
from stages import adapt, warmup


def _cfg(bench: Path, **kw: object) -> adapt.AdaptConfig:
    base = tiny_warmup(bench)
    cfg = adapt.AdaptConfig(
        source=f"gta5:{bench / 'source'}",
        target=f"cityscapes:{bench / 'target'}",
        val=f"cityscapes:{bench / 'target'}",
        device="cpu",
        batch_size=2,
        num_workers=0,
        optim=base.optim,
        loop=base.loop,
        augment=base.augment,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_confidence_weight_is_one_scalar_per_image():
    probs = torch.tensor([[0.99, 0.6], [0.01, 0.4]]).view(1, 2, 1, 2)  # pixel maxima .99, .6
    probs = torch.cat([probs, probs.flip(1)])
    labels, weights = pseudo_labels_and_weights(probs, 0.968)
    assert labels.tolist() == [[[0, 0]], [[1, 1]]]
    assert torch.allclose(weights, torch.full((2, 1, 2), 0.5))


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]]).T.reshape(
        1, 2, 1, 2
    )  # pixel0 (2,0), pixel1 (0,0)
    labels = torch.tensor([[[0, 255]]])
    weights = torch.tensor([[[0.5, 1.0]]])
    expected = 0.5 * -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
    assert torch.isclose(weighted_cross_entropy(logits, labels, weights), expected)


def test_ema_update_and_ramp():
    t, s = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        t.weight.fill_(1.0)
        s.weight.fill_(3.0)
    ema_update(t, s, 0.75)
    assert t.weight.item() == pytest.approx(1.5)
    assert ema_momentum(0, 0.999, True) == 0.0
    assert ema_momentum(9, 0.999, True) == pytest.approx(0.9)
    assert ema_momentum(10**6, 0.999, True) == 0.999
    assert ema_momentum(0, 0.99, False) == 0.99


def test_classmix_takes_half_the_classes_of_the_labelled_image():
    lab = torch.tensor([[[0, 1, 2, 3], [0, 1, 255, 3]]])
    masks = classmix_masks(lab, torch.Generator().manual_seed(0))
    chosen = lab[masks[:, 0].bool()].unique()
    assert len(chosen) == 2 and 255 not in chosen.tolist()
    mixed = mix(masks, lab, torch.full_like(lab, 9))
    assert set(mixed.unique().tolist()) == set(chosen.tolist()) | {9}


def test_adapt_none_runs_and_saves_student_teacher_and_method(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    manifest = adapt.run(_cfg(tiny_bench), warm, tmp_path / "a")
    assert manifest["complete"] and manifest["results"]["iterations"] == 4
    state = load_checkpoint(tmp_path / "a" / "last.pt")["train_state"]["modules"]
    assert set(state) == {"model", "teacher", "method"}
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert all("ce_unlabelled" in e for e in log if "ce_labelled" in e)
    # the teacher moved towards the student, and differs from it (EMA)
    start = load_checkpoint(warm)["state_dict"]
    key = next(k for k in start if k.endswith("weight") and start[k].dim() == 4)
    assert not torch.equal(state["teacher"][key], start[key])
    assert not torch.equal(state["teacher"][key], state["model"][key])


def test_semi_setting_writes_a_reproducible_split(tiny_bench: Path, warm: Path, tmp_path: Path):
    cfg = _cfg(tiny_bench, setting="semi", source=None, labeled_fraction=0.5)
    adapt.run(cfg, warm, tmp_path / "s")
    lab = (tmp_path / "s" / "labelled.txt").read_text().split()
    unlab = (tmp_path / "s" / "unlabelled.txt").read_text().split()
    assert len(lab) == 2 and len(unlab) == 2 and not set(lab) & set(unlab)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lab))
    cfg2 = _cfg(tiny_bench, setting="semi", source=None, labeled_list=str(listing))
    cfg2.loop.iterations = 1
    adapt.run(cfg2, warm, tmp_path / "s2")
    assert (tmp_path / "s2" / "labelled.txt").read_text().split() == lab


def test_labelled_only_baselines_train_on_the_semi_split(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    """``warmup`` and ``adapt --setting supervised`` with the same fraction and seed as a
    ``semi`` run label the same images of the same data, and train on those alone."""
    target = f"cityscapes:{tiny_bench / 'target'}"
    semi = _cfg(tiny_bench, setting="semi", source=None, labeled_fraction=0.5, seed=4)
    semi.loop.iterations = 1
    adapt.run(semi, warm, tmp_path / "semi")
    lab = (tmp_path / "semi" / "labelled.txt").read_text().split()
    sup = _cfg(tiny_bench, setting="supervised", source=target, labeled_fraction=0.5, seed=4)
    sup.loop.iterations = 1
    adapt.run(sup, warm, tmp_path / "sup")
    assert (tmp_path / "sup" / "labelled.txt").read_text().split() == lab
    assert not (tmp_path / "sup" / "unlabelled.txt").exists()
    pre = tiny_warmup(tiny_bench, source=target, labeled_fraction=0.5, seed=4)
    pre.loop.iterations = 1
    manifest = warmup.run(pre, tmp_path / "pre")
    assert (tmp_path / "pre" / "labelled.txt").read_text().split() == lab
    full = open_dataset(target, "train")
    assert (
        manifest["inputs"]["source"]
        == full.subset([i for i, item in enumerate(full.items) if item[2] in lab]).fingerprint()
    )
    with pytest.raises(UserError, match="for --setting semi or supervised"):
        adapt.run(_cfg(tiny_bench, labeled_fraction=0.5), warm, tmp_path / "uda")


def test_split_labelled_is_seeded_and_listing_wins(tiny_bench: Path, tmp_path: Path):
    ds = open_dataset(f"gta5:{tiny_bench / 'source'}", "train")  # 6 images
    lab, unlab = split_labelled(ds, 0.5, None, seed=0)
    assert len(lab) == 3 and sorted(lab + unlab) == list(range(6))
    assert split_labelled(ds, 0.5, None, seed=0) == (lab, unlab)
    assert any(split_labelled(ds, 0.5, None, seed=s)[0] != lab for s in range(1, 6))
    assert len(split_labelled(ds, 0.01, None, seed=0)[0]) == 1  # never an empty share
    assert split_labelled(ds, 1.0, None, seed=0) == (list(range(6)), [])
    listing = tmp_path / "names.txt"
    listing.write_text(f"{ds.items[5][2]}\n\n{ds.items[1][2]}\n")
    assert split_labelled(ds, 0.5, listing, seed=0) == ([1, 5], [0, 2, 3, 4])
    listing.write_text("no_such_image\n")
    with pytest.raises(UserError, match="'no_such_image' is not in the dataset"):
        split_labelled(ds, None, listing, seed=0)


def test_supervised_setting_has_no_unlabelled_stream(tiny_bench: Path, warm: Path, tmp_path: Path):
    adapt.run(_cfg(tiny_bench, setting="supervised", target=None), warm, tmp_path / "p")
    log = (tmp_path / "p" / "train_log.jsonl").read_text()
    assert "ce_labelled" in log and "ce_unlabelled" not in log


def test_ohem_labelled_loss_is_at_least_the_plain_one(tiny_bench: Path, warm: Path, tmp_path: Path):
    """Same model and first batch: OHEM averages the hardest pixels' CE, so it is larger (the
    untrained model gives every label p < 0.7: a lower threshold makes the cut)."""
    first = {}
    for loss in ("ce", "ohem"):
        cfg = _cfg(tiny_bench, setting="supervised", target=None)
        cfg.loop.iterations, cfg.loop.log_every = 1, 1
        cfg.self_training.labelled_loss, cfg.self_training.ohem_threshold = loss, 0.05
        adapt.run(cfg, warm, tmp_path / loss)
        lines = (tmp_path / loss / "train_log.jsonl").read_text().splitlines()
        first[loss] = next(e["ce_labelled"] for e in map(json.loads, lines) if "ce_labelled" in e)
    assert first["ohem"] > first["ce"] > 0
    cfg.self_training.labelled_loss = "focal"
    with pytest.raises(UserError, match="self_training.labelled_loss 'focal'"):
        adapt.run(cfg, warm, tmp_path / "focal")


def test_teacher_norm_batch_changes_the_pseudo_labels_and_keeps_the_teacher(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    """The same first step with the teacher normalising the target batch by its own
    statistics gives other pseudo labels (their logged mIoU), and the teacher's running
    statistics move only by the EMA (equal in both runs after one step)."""
    first, teacher_var = {}, {}
    for norm in ("running", "batch"):
        cfg = _cfg(tiny_bench)
        cfg.loop.iterations, cfg.loop.log_every = 1, 1
        cfg.self_training.teacher_norm = norm
        adapt.run(cfg, warm, tmp_path / norm)
        lines = (tmp_path / norm / "train_log.jsonl").read_text().splitlines()
        first[norm] = next(e for e in map(json.loads, lines) if "ce_unlabelled" in e)
        ckpt = torch.load(tmp_path / norm / "last.pt", weights_only=True)
        state = ckpt["train_state"]["modules"]["teacher"]
        teacher_var[norm] = next(v for k, v in state.items() if k.endswith("running_var"))
    assert first["batch"]["pl_mIoU"] != first["running"]["pl_mIoU"]
    assert first["batch"]["ce_labelled"] == first["running"]["ce_labelled"]
    assert torch.equal(teacher_var["batch"], teacher_var["running"])
    cfg.self_training.teacher_norm = "group"
    with pytest.raises(UserError, match="self_training.teacher_norm 'group'"):
        adapt.run(cfg, warm, tmp_path / "group")


def test_match_colour_statistics_by_hand():
    """Channel 0 of the image is -1, 1 (mean 0, std 1) and a padding pixel left out; the
    reference's 0.5, 0.7 (mean 0.6, std 0.1): the image becomes 0.5, 0.7. Channel 1's reference
    (1, 5) asks for more than an 8-bit image holds: 5 is clipped at (1 - mean) / std."""
    image = torch.zeros(1, 3, 1, 3)
    image[0, :, 0] = torch.tensor([-1.0, 1.0, 9.0])
    ref = torch.zeros(1, 3, 1, 2)
    ref[0, 0, 0] = torch.tensor([0.5, 0.7])
    ref[0, 1, 0] = torch.tensor([1.0, 5.0])
    ref[0, 2, 0] = torch.tensor([0.0, 0.0])
    valid = torch.tensor([[[True, True, False]]])
    out = match_colour_statistics(image, ref, valid)
    eps = 1e-3
    assert torch.allclose(
        out[0, 0, 0, :2], torch.tensor([0.6 - 0.1 / (1 + eps), 0.6 + 0.1 / (1 + eps)])
    )
    top = (1 - 0.456) / 0.224  # channel 1's largest normalised value
    assert torch.allclose(out[0, 1, 0, :2], torch.tensor([3.0 - 2 / (1 + eps), top]))
    assert torch.allclose(out[0, 2, 0, :2], torch.zeros(2))  # a flat reference: its mean


def _first_logged_step(cfg: adapt.AdaptConfig, warm: Path, out: Path) -> dict:
    cfg.loop.iterations, cfg.loop.log_every = 1, 1
    adapt.run(cfg, warm, out)
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return next(e for e in map(json.loads, lines) if "ce_unlabelled" in e)


def test_target_colour_stats_recolours_the_labelled_images_only(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    """The first step with every labelled image recoloured: another labelled loss, the same
    pseudo labels (the unlabelled batch the colours came from is the one the teacher sees)."""
    first = {}
    for share in (0.0, 1.0):
        cfg = _cfg(tiny_bench)
        cfg.self_training.target_colour_stats = share
        first[share] = _first_logged_step(cfg, warm, tmp_path / str(share))
    assert first[1.0]["ce_labelled"] != first[0.0]["ce_labelled"]
    assert first[1.0]["pl_mIoU"] == first[0.0]["pl_mIoU"]
    assert first[1.0]["pl_confident"] == first[0.0]["pl_confident"]


def test_weak_view_pseudo_labels_image_share_or_pixel_mask():
    """Two pixels, one confident (0.98 > 0.968): DAFormer's weights are the share 0.5 on
    both, the pixel mask 1 and 0."""
    probs = torch.tensor([[0.98, 0.60], [0.02, 0.40]]).view(1, 2, 1, 2)
    st = SelfTrainingConfig()
    labels, weights = weak_view_pseudo_labels(probs, st)
    assert labels.tolist() == [[[0, 0]]] and weights.tolist() == [[[0.5, 0.5]]]
    st.pseudo_weighting = "pixel"
    labels, weights = weak_view_pseudo_labels(probs, st)
    assert labels.tolist() == [[[0, 0]]] and weights.tolist() == [[[1.0, 0.0]]]


def test_flip_averaged_is_the_mean_of_the_view_and_its_mirror():
    """A 'model' whose logits are (x, -x) of a 1x2 image: on [a, b] its probabilities of
    class 0 are sigmoid(2a), sigmoid(2b); on the mirror, mirrored back, the same: averaging
    a view with its own mirror changes nothing for a symmetric model. A model that adds the
    column index breaks the symmetry: the mean is taken pixel by pixel."""

    class Column(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> SimpleNamespace:
            col = torch.arange(x.shape[-1], dtype=x.dtype).view(1, 1, 1, -1)
            return SimpleNamespace(logits=torch.cat([x[:, :1] + col, -x[:, :1] - col], 1))

    image = torch.tensor([0.5, -0.25]).view(1, 1, 1, 2)
    model = Column()
    probs = flip_averaged(model(image).logits, model, image).softmax(1)
    # pixel j sees column j in the view, column 1 - j in the mirror
    p0 = (torch.sigmoid(torch.tensor([2 * 0.5, 2 * (-0.25 + 1)]))
          + torch.sigmoid(torch.tensor([2 * (0.5 + 1), 2 * -0.25]))) / 2  # fmt: skip
    assert torch.allclose(probs[0, 0, 0], p0, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(1, 1, 2))


def test_pseudo_weighting_is_checked(tiny_bench: Path, warm: Path, tmp_path: Path):
    cfg = _cfg(tiny_bench)
    cfg.self_training.pseudo_weighting = "soft"
    with pytest.raises(UserError, match="self_training.pseudo_weighting 'soft': expected one"):
        adapt.run(cfg, warm, tmp_path / "soft")


def test_teacher_flip_runs_an_adaptation(tiny_bench: Path, warm: Path, tmp_path: Path):
    cfg = _cfg(tiny_bench)
    cfg.self_training.teacher_flip = True
    cfg.self_training.pseudo_weighting = "pixel"
    cfg.loop.iterations = 2
    adapt.run(cfg, warm, tmp_path / "flip")
    assert (tmp_path / "flip" / "model.pt").is_file()


@pytest.mark.parametrize(("norm_from", "forwards"), [("all", 2), ("unlabelled", 1)])
def test_student_norm_from_says_which_forwards_move_the_statistics(
    tiny_bench: Path, warm: Path, tmp_path: Path, norm_from: str, forwards: int
):
    """A step runs the student on the labelled and on the mixed batch: BatchNorm counts the
    forwards that moved its running statistics."""
    before = torch.load(warm, weights_only=True)["state_dict"]
    cfg = _cfg(tiny_bench)
    cfg.loop.iterations, cfg.loop.log_every = 1, 1
    cfg.self_training.student_norm_from = norm_from
    adapt.run(cfg, warm, tmp_path / norm_from)
    after = torch.load(tmp_path / norm_from / "model.pt", weights_only=True)["state_dict"]
    key = next(k for k in after if k.endswith("num_batches_tracked"))
    assert int(after[key] - before[key]) == forwards
    cfg.self_training.student_norm_from = "source"
    with pytest.raises(UserError, match="self_training.student_norm_from 'source'"):
        adapt.run(cfg, warm, tmp_path / "source")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "magic"}, "--method magic"),
        ({"setting": "weird"}, "--setting weird"),
        ({"target": None}, "needs --target"),
        ({"setting": "semi", "labeled_fraction": None}, "needs --labeled-fraction"),
        ({"setting": "semi", "labeled_fraction": 1.5}, r"must lie in \(0, 1\]"),
        ({"setting": "semi", "labeled_fraction": 1.0}, "every image is labelled"),
    ],
)
def test_adapt_user_errors(tiny_bench: Path, warm: Path, tmp_path: Path, changes, message):
    with pytest.raises(UserError, match=message):
        adapt.run(_cfg(tiny_bench, **changes), warm, tmp_path / "x")


@pytest.fixture(scope="module")
def pseudo(tiny_bench: Path, warm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages import pseudolabel

    out = tmp_path_factory.mktemp("pseudo")
    cfg = pseudolabel.PseudolabelConfig(
        target=f"cityscapes:{tiny_bench / 'target'}", device="cpu", num_workers=0
    )
    pseudolabel.run(cfg, warm, out)
    return out / "pseudo.h5"


def test_adapt_cpsl_runs_all_terms_and_fills_the_bank(
    tiny_bench: Path, warm: Path, pseudo: Path, tmp_path: Path
):
    cfg = _cfg(tiny_bench, method="cpsl", pseudo=str(pseudo))
    cfg.cpsl.samples_per_image = 16
    cfg.cpsl.memory_length = 5
    adapt.run(cfg, warm, tmp_path / "c")
    log = [json.loads(x) for x in (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "ce_labelled" in e]
    assert len(steps) == 4 and all(e["sl"] > 0 and e["reg"] >= 0 for e in steps)
    # the rectified labels (pl_) and the teacher's own, before the rectification (pl_teacher_)
    assert all(0 <= e["pl_teacher_mIoU"] <= 100 and "road" in e["pl_teacher_IoU"] for e in steps)
    method = load_checkpoint(tmp_path / "c" / "last.pt")["train_state"]["modules"]["method"]
    # the tiny model's feature grid of a 32x32 crop is 1x1 (stride 32): 4 steps x 2 images x 1
    # sample = 8 rows pushed into a 5-row bank, which is full and has wrapped
    assert int(method["bank.size"]) == 5 and int(method["bank.pointer"]) == 8 % 5
    assert torch.isclose(method["delta_pseudo"].sum(), torch.tensor(1.0), atol=1e-4)
    assert not torch.equal(method["head.weight"], method["momentum_head.weight"])


def test_adapt_cpsl_without_pseudo_file_is_refused(tiny_bench: Path, warm: Path, tmp_path: Path):
    with pytest.raises(UserError, match="needs --pseudo"):
        adapt.run(_cfg(tiny_bench, method="cpsl"), warm, tmp_path / "c")


def test_cpsl_pseudo_labels_from_the_file_or_the_online_teacher(tiny_bench: Path, pseudo: Path):
    target = open_dataset(f"cityscapes:{tiny_bench / 'target'}", "train")
    dim = PseudoLabelFile(pseudo).prototypes.shape[1]
    setup = MethodSetup(num_classes=19, feature_dim=dim, device=torch.device("cpu"),
                        unlabelled=target, pseudo=pseudo)  # fmt: skip
    teacher = torch.zeros(1, 19, 8, 8)
    teacher[:, 7, :, :4], teacher[:, 2, :, 4:] = 9.0, 9.0  # the teacher: left 7, right 2
    weight = torch.full((1, 8, 8), 0.25)  # the loop's confidence weight

    def labels_of(source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg = CPSLConfig(pseudo_labels=source, self_labeling=False)  # P_SL = 1: argmax P_ST
        method = METHODS["cpsl"](setup, cfg)
        ctx = StepContext(
            step=0, labelled_image=torch.zeros(1, 3, 8, 8), labelled_label=torch.zeros(1, 8, 8),
            unlabelled_image=torch.zeros(1, 3, 8, 8), unlabelled_index=torch.tensor([0]),
            unlabelled_geometry=geometry_to_tensor(CropGeometry((8, 8), 0, 0, (8, 8), False))[None],
            teacher_logits=teacher, pseudo_weight=weight,
            teacher_output=SegOutput(logits=teacher, features=torch.zeros(1, dim, 2, 2)),
        )  # fmt: skip
        return (*method.target_labels(ctx), method.soft_labels.crops(ctx))

    labels, weights, file_probs = labels_of("teacher")
    assert torch.all(labels[0, :, :4] == 7) and torch.all(labels[0, :, 4:] == 2)
    assert torch.equal(weights, weight)
    labels, weights, file_probs = labels_of("file")
    assert torch.equal(labels, file_probs.argmax(1)) and torch.all(weights == 1)
    assert not torch.any(labels == IGNORE_INDEX)
    with pytest.raises(UserError, match="cpsl.pseudo_labels 'online': expected 'file' or"):
        CPSLConfig(pseudo_labels="online")
