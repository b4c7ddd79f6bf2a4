"""Tests for the YOLOv5-style anchor loss (model-spec §7): gains, assignment, CIoU, objectness and training signal."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ems_yolo.nn.loss import YOLOv5Loss

STRIDE = torch.tensor([16.0, 32.0])
ANCHORS_PX = torch.tensor(
    [
        [[10, 14], [23, 27], [37, 58]],
        [[81, 82], [135, 169], [216, 269]],
    ],
    dtype=torch.float32,
)
ANCHORS = ANCHORS_PX / STRIDE.view(-1, 1, 1)  # grid units


def make_loss(nc: int = 2, **hyp) -> YOLOv5Loss:
    """Loss for the Gen1 two-level head."""
    return YOLOv5Loss(nc, ANCHORS, STRIDE, hyp)


def make_preds(bs: int = 2, nc: int = 2, imgsz: int = 320, seed: int | None = 0, scale: float = 1.0):
    """Raw head logits for both levels; random (seeded) or zeros when seed is None."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    preds = []
    for s in (16, 32):
        shape = (bs, 3, imgsz // s, imgsz // s, nc + 5)
        preds.append(torch.randn(shape, generator=gen) * scale if gen is not None else torch.zeros(shape))
    return preds


def make_batch(rows) -> dict:
    """Ultralytics batch dict from rows (image, class, cx, cy, w, h)."""
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"batch_idx": t[:, 0], "cls": t[:, 1:2], "bboxes": t[:, 2:6]}


def ciou_reference(p, t, eps: float = 1e-7) -> float:
    """CIoU of two (cx, cy, w, h) boxes written out from the model-spec §7 formula."""
    (px, py, pw, ph), (tx, ty, tw, th) = p, t
    iw = max(0.0, min(px + pw / 2, tx + tw / 2) - max(px - pw / 2, tx - tw / 2))
    ih = max(0.0, min(py + ph / 2, ty + th / 2) - max(py - ph / 2, ty - th / 2))
    inter = iw * ih
    iou = inter / (pw * ph + tw * th - inter + eps)
    cw = max(px + pw / 2, tx + tw / 2) - min(px - pw / 2, tx - tw / 2)
    ch = max(py + ph / 2, ty + th / 2) - min(py - ph / 2, ty - th / 2)
    rho2 = (px - tx) ** 2 + (py - ty) ** 2
    v = 4 / math.pi**2 * (math.atan(tw / th) - math.atan(pw / ph)) ** 2
    alpha = v / (v - iou + 1 + eps)
    return iou - rho2 / (cw**2 + ch**2 + eps) - alpha * v


def bce(x: float, y: float) -> float:
    """Binary cross-entropy with logits for one element."""
    return max(x, 0.0) - x * y + math.log1p(math.exp(-abs(x)))


def reference_loss(preds, rows, nc: int, imgsz: int, gr: float = 1.0) -> list[float]:
    """Loop-over-everything re-implementation of model-spec §7 with default hyp; returns gained [box, obj, cls]."""
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    l_box = l_obj = l_cls = 0.0
    for level, (p, balance) in enumerate(zip(preds, (4.0, 1.0))):
        p = p.detach().double()
        bs, na, ny, nx, _ = p.shape
        tobj = torch.zeros(bs, na, ny, nx, dtype=torch.float64)
        box_terms, cls_terms = [], []
        for k in range(5):  # centre, left, up, right, down; YOLOv5 write order: offset, anchor, target
            for a in range(na):
                aw, ah = ANCHORS[level, a].tolist()
                for b, c, cx, cy, w, h in rows:
                    gx, gy, gw, gh = cx * nx, cy * ny, w * nx, h * ny
                    if max(gw / aw, aw / gw, gh / ah, ah / gh) >= 4.0:
                        continue
                    col, row = math.floor(gx), math.floor(gy)
                    fx, fy = gx - col, gy - row
                    if k == 1 and not (fx < 0.5 and gx > 1):
                        continue
                    if k == 2 and not (fy < 0.5 and gy > 1):
                        continue
                    if k == 3 and not (fx > 0.5 and nx - gx > 1):
                        continue
                    if k == 4 and not (fy > 0.5 and ny - gy > 1):
                        continue
                    col += (0, -1, 0, 1, 0)[k]
                    row += (0, 0, -1, 0, 1)[k]
                    col, row = min(max(col, 0), nx - 1), min(max(row, 0), ny - 1)
                    v = p[int(b), a, row, col].tolist()
                    pxy = (2 * sig(v[0]) - 0.5, 2 * sig(v[1]) - 0.5)
                    pred = (*pxy, (2 * sig(v[2])) ** 2 * aw, (2 * sig(v[3])) ** 2 * ah)
                    ciou = ciou_reference(pred, (gx - col, gy - row, gw, gh))
                    box_terms.append(1 - ciou)
                    tobj[int(b), a, row, col] = (1 - gr) + gr * max(ciou, 0.0)
                    cls_terms += [bce(v[5 + j], float(j == int(c))) for j in range(nc)]
        if box_terms:
            l_box += sum(box_terms) / len(box_terms)
            l_cls += sum(cls_terms) / len(cls_terms)
        obj = [bce(x, y) for x, y in zip(p[..., 4].flatten().tolist(), tobj.flatten().tolist())]
        l_obj += balance * sum(obj) / len(obj)
    box_gain, obj_gain, cls_gain = 0.05 * 1.5, (imgsz / 640) ** 2 * 1.5, 0.5 * nc / 80 * 1.5
    return [l_box * box_gain, l_obj * obj_gain, l_cls * (cls_gain if nc > 1 else 0.0)]


RANDOM_ROWS = [
    (0, 1, 0.31, 0.47, 0.15, 0.16),
    (0, 0, 0.315, 0.465, 0.12, 0.2),  # same cells as the row above: objectness collision
    (0, 1, 0.83, 0.12, 0.4, 0.35),
    (1, 0, 0.55, 0.72, 0.06, 0.09),
    (1, 1, 1.0, 0.0, 0.3, 0.5),  # centre on the image corner: indices clamped to the grid
    (1, 0, 0.03, 0.96, 0.05, 0.04),
]


def test_gains_rescaled_for_two_levels_and_input_size():
    loss = make_loss(nc=2)
    assert loss.gains(320) == pytest.approx((0.075, 0.375, 0.01875))
    assert loss.gains(640) == pytest.approx((0.075, 1.5, 0.01875))
    assert make_loss(nc=80).gains(640) == pytest.approx((0.075, 1.5, 0.75))
    assert make_loss(nc=2, obj_imgsz=640).gains(320) == pytest.approx((0.075, 1.5, 0.01875))


@pytest.mark.parametrize("imgsz", [320, 256])
def test_components_match_loop_reference(imgsz):
    preds = make_preds(imgsz=imgsz, seed=1)
    total, items = make_loss(nc=2)(preds, make_batch(RANDOM_ROWS))
    expected = reference_loss(preds, RANDOM_ROWS, nc=2, imgsz=imgsz)
    got = [items[k].item() for k in ("box_loss", "obj_loss", "cls_loss")]
    assert got == pytest.approx(expected, rel=1e-5)
    assert total.shape == (3,)
    assert total.tolist() == pytest.approx([2 * e for e in expected], rel=1e-5)
    assert all(v.ndim == 0 and not v.requires_grad for v in items.values())


def test_reference_with_partial_objectness_mix_and_single_class():
    preds = make_preds(nc=1, seed=2)
    rows = [(r[0], 0, *r[2:]) for r in RANDOM_ROWS]
    _, items = make_loss(nc=1, gr=0.5)(preds, make_batch(rows))
    expected = reference_loss(preds, rows, nc=1, imgsz=320, gr=0.5)
    assert [items[k].item() for k in ("box_loss", "obj_loss", "cls_loss")] == pytest.approx(expected, rel=1e-5)
    assert items["cls_loss"].item() == 0.0


def test_hand_built_assignment_and_objectness_targets():
    # P4 grid 20x20: centre (6.3, 9.8) cells, size 3.0 x 3.2 cells -> anchors 1, 2 pass (anchor 0: ratio 4.8).
    # P5 grid 10x10: centre (3.15, 4.9), size 1.5 x 1.6 -> anchors 0, 1 pass (anchor 2: ratio 4.5).
    rows = [(1, 0, 0.315, 0.49, 0.15, 0.16)]
    loss = make_loss(nc=2, gr=0.0)  # objectness target exactly 1 at assigned cells
    preds = [p.requires_grad_() for p in make_preds(seed=None)]
    targets = torch.tensor(rows, dtype=torch.float32)
    assigned = loss.build_targets(preds, targets)

    expected_cells = {0: [(9, 6), (9, 5), (10, 6)], 1: [(4, 3), (4, 2), (5, 3)]}  # (row, col): centre, left, down
    expected_anchors = {0: [1, 2], 1: [0, 1]}
    for level, t in enumerate(assigned):
        got = sorted(zip(t.anchor.tolist(), t.gy.tolist(), t.gx.tolist()))
        want = sorted((a, r, c) for a in expected_anchors[level] for r, c in expected_cells[level])
        assert got == want
        assert set(t.img.tolist()) == {1} and set(t.cls.tolist()) == {0}
        # Box target is the centre relative to the assigned cell plus the size, in grid units.
        n = 20 // (level + 1)
        gxy = torch.tensor([0.315 * n, 0.49 * n])
        cell = torch.stack((t.gx, t.gy), 1).float()
        torch.testing.assert_close(t.box[:, :2], gxy - cell)
        torch.testing.assert_close(t.box[:, 2:], torch.tensor([0.15 * n, 0.16 * n]).expand(len(t.img), 2))
        torch.testing.assert_close(t.anchor_wh, ANCHORS[level, t.anchor])

    # With zero logits d(obj term)/dx = gain * balance * bs * (sigmoid(0) - target) / numel: recover the target map.
    total, _ = loss(preds, make_batch(rows))
    total[1].backward()
    _, obj_gain, _ = loss.gains(320)
    for level, (p, balance) in enumerate(zip(preds, (4.0, 1.0))):
        grad = p.grad[..., 4]
        tobj = 0.5 - grad * grad.numel() / (obj_gain * balance * 2)
        want = torch.zeros_like(tobj)
        for a in expected_anchors[level]:
            for r, c in expected_cells[level]:
                want[1, a, r, c] = 1.0
        torch.testing.assert_close(tobj, want, atol=1e-5, rtol=0)


def test_neighbours_respect_borders_and_indices_are_clamped():
    loss = make_loss()
    preds = make_preds(seed=None)
    # x: 0.3 cells from the left border (no left neighbour). y: exactly on the bottom edge, so the centre row 20 is
    # clamped to 19, which is also the up neighbour (integer centre, frac 0 < 0.5): the cell is assigned twice.
    [t, _] = loss.build_targets(preds, torch.tensor([[0, 0, 0.3 / 20, 1.0, 0.1, 0.1]]))
    for a in t.anchor.unique().tolist():
        sel = t.anchor == a
        assert sorted(zip(t.gy[sel].tolist(), t.gx[sel].tolist())) == [(19, 0), (19, 0)]  # clamped centre + up
    assert int(t.gy.max()) == 19 and int(t.gx.min()) == 0


def test_exact_decoding_gives_zero_box_loss():
    rows = [(0, 1, 0.42, 0.37, 0.2, 0.25), (1, 0, 0.71, 0.58, 0.08, 0.12)]
    loss = make_loss(nc=2)
    preds = make_preds(seed=3)
    for p, t in zip(preds, loss.build_targets(preds, torch.tensor(rows))):
        # Invert p_xy = 2σ - 0.5 and p_wh = (2σ)^2 * anchor at every assigned (image, anchor, cell).
        p[t.img, t.anchor, t.gy, t.gx, 0:2] = torch.logit((t.box[:, :2] + 0.5) / 2)
        p[t.img, t.anchor, t.gy, t.gx, 2:4] = torch.logit((t.box[:, 2:] / t.anchor_wh).sqrt() / 2)
    _, items = loss(preds, make_batch(rows))
    assert items["box_loss"].item() == pytest.approx(0.0, abs=1e-5)
    # Perfect boxes make every objectness target 1: the reference (independent assignment) agrees.
    assert items["obj_loss"].item() == pytest.approx(reference_loss(preds, rows, 2, 320)[1], rel=1e-5)


def test_empty_targets_give_objectness_only_with_gradient():
    preds = [p.requires_grad_() for p in make_preds(seed=4)]
    total, items = make_loss()(preds, make_batch([]))
    assert items["box_loss"].item() == 0.0 and items["cls_loss"].item() == 0.0
    assert items["obj_loss"].item() > 0.0 and torch.isfinite(total).all()
    total.sum().backward()
    for p in preds:
        assert torch.isfinite(p.grad).all()
        assert p.grad[..., 4].abs().sum() > 0
        assert p.grad[..., :4].abs().sum() == 0 and p.grad[..., 5:].abs().sum() == 0
    expected = reference_loss(preds, [], nc=2, imgsz=320)
    assert items["obj_loss"].item() == pytest.approx(expected[1], rel=1e-5)


def test_sgd_steps_reduce_total_loss():
    preds = [p.requires_grad_() for p in make_preds(seed=5)]
    loss = make_loss()
    batch = make_batch(RANDOM_ROWS)
    opt = torch.optim.SGD(preds, lr=200.0)  # large: the loss is a mean over every map cell
    history = []
    for _ in range(20):
        total, items = loss(preds, batch)
        history.append(total.sum().item())
        opt.zero_grad()
        total.sum().backward()
        opt.step()
    assert history[-1] < 0.5 * history[0]
    assert all(b < a for a, b in zip(history, history[1:]))


def test_tuple_input_and_long_batch_index_match_list_input():
    preds = make_preds(seed=6)
    loss = make_loss()
    batch = make_batch(RANDOM_ROWS)
    ref, ref_items = loss(preds, batch)
    out, items = loss((torch.zeros(2, 10, 7), preds), {**batch, "batch_idx": batch["batch_idx"].long()})
    torch.testing.assert_close(out, ref)
    assert items.keys() == ref_items.keys() == {"box_loss", "obj_loss", "cls_loss"}


def test_autocast_low_precision_preds_computed_in_float32():
    preds = make_preds(seed=7)
    half = [p.bfloat16() for p in preds]
    loss = make_loss()
    batch = make_batch(RANDOM_ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = loss(half, batch)
    ref, _ = loss([p.float() for p in half], batch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_unknown_hyp_key_raises():
    with pytest.raises(ValueError, match="boxx"):
        make_loss(boxx=0.1)
    with pytest.raises(ValueError, match="balance"):
        make_loss(balance=[4.0, 1.0, 0.4])


def test_from_model_reads_head_and_yaml_overrides():
    head = SimpleNamespace(nc=3, anchor_grid=ANCHORS, stride=STRIDE)
    model = SimpleNamespace(model=[torch.nn.Identity(), head], yaml={"loss": {"obj_imgsz": 640, "box": 0.1}})
    loss = YOLOv5Loss.from_model(model)
    assert (loss.nc, loss.nl, loss.na) == (3, 2, 3)
    assert loss.gains(320) == pytest.approx((0.15, 1.5, 0.5 * 3 / 80 * 1.5))
    plain = YOLOv5Loss.from_model(SimpleNamespace(model=[head], yaml={}))
    assert plain.hyp["box"] == 0.05
