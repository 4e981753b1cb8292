"""CropFormer's training loss L = 0.5 L_i + 1.0 L_b (image level + batch level).

Each level matches queries to ground truth (:mod:`entityseg.losses.matcher`), then supervises
the entity scores U^e with a 2-way cross-entropy over all queries (matched -> entity, the rest
-> no-entity, weighted 1 / ``no_entity_weight``) and the masks U^m of matched queries with
sigmoid BCE + Dice on importance-sampled points (or, with ``num_points=None``, on every pixel
centre of the predicted masks: deterministic, as the release's one-step reference). Every
deep-supervision prediction gets the same losses with its own matching. Mask losses are summed
over masks and divided by the number of target masks in the (distributed) batch, as the
release does:

- image level: every (image, view) is a problem; a target mask is an entity visible in a view,
  normaliser = number of such entity-view pairs;
- batch level: one problem per image over all views; each matched entity contributes one mask
  loss per view (its empty views included), normaliser = number of entities.

Under ``trainer.precision=bf16-mixed`` the network's outputs are bf16: the criterion turns
autocast off and reads the predictions in float32 (matching costs, point sampling, losses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from entityseg.losses.matcher import HungarianMatcher
from entityseg.losses.point_sampling import dense_points, point_sample, uncertain_points

ENTITY, NO_ENTITY = 0, 1


def sigmoid_bce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over masks of the mean pointwise sigmoid BCE: [K, P] x [K, P] -> scalar."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum()


def dice_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum over masks of 1 - (2 sum(p t) + 1) / (sum p + sum t + 1): [K, P] x [K, P] -> scalar."""
    probs = logits.sigmoid()
    numerator = 2.0 * (probs * labels).sum(1)
    denominator = probs.sum(1) + labels.sum(1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum()


def num_target_masks(count: int, device: torch.device) -> Tensor:
    """Mask-loss normaliser: ``count`` averaged over distributed ranks, at least 1."""
    total = torch.tensor(float(count), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return total.clamp(min=1.0)


class _SetLoss(nn.Module):
    """What both levels share: weights, matcher, weighted CE and point-sampled mask losses."""

    level = ""

    def __init__(
        self,
        matcher: HungarianMatcher,
        class_weight: float,
        mask_weight: float,
        dice_weight: float,
        no_entity_weight: float,
        num_points: int | None,
        oversample_ratio: float,
        importance_sample_ratio: float,
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.register_buffer("ce_weight", torch.tensor([1.0, no_entity_weight]), persistent=False)

    def entity_ce(self, logits: Tensor, matched: Tensor) -> Tensor:
        """Weighted 2-way CE averaged over all queries: logits [..., Q, 2], matched bool[..., Q]."""
        classes = torch.full_like(matched, NO_ENTITY, dtype=torch.long)
        classes[matched] = ENTITY
        return F.cross_entropy(logits.flatten(0, -2).float(), classes.flatten(), self.ce_weight)

    def mask_losses(
        self, pred_masks: Tensor, targets: Sequence[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor]:
        """(BCE sum, Dice sum) of K matched pairs: logits [K, h, w] against target masks.

        ``targets``: blocks ``(masks bool [M, H, W], rows long [K_j])`` whose rows, block after
        block, are the K targets in order (one block per image and view). Points are
        importance-sampled per mask by the prediction's uncertainty (or every pixel centre of
        the prediction, ``num_points=None``) and read the target (4x the resolution) at the
        same normalised positions.
        """
        pred_masks = pred_masks.float().unsqueeze(1)  # [K, 1, h, w], float32 under bf16
        if self.num_points is None:
            points = dense_points(*pred_masks.shape[-2:], device=pred_masks.device)
            points = points[None].expand(pred_masks.shape[0], -1, -1)  # [K, h*w, 2]
        else:
            points = uncertain_points(  # [K, P, 2]
                pred_masks.detach(),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
        with torch.no_grad():
            labels = torch.cat(  # [K, P]
                [
                    point_sample(
                        masks[rows.to(masks.device)].unsqueeze(1).float(),  # [K_j, 1, H, W]
                        block_points.to(masks.device),
                    ).squeeze(1)
                    for (masks, rows), block_points in zip(
                        targets, points.split([len(rows) for _, rows in targets]), strict=True
                    )
                ]
            ).to(pred_masks.device)
        logits = point_sample(pred_masks, points).squeeze(1).float()  # [K, P]
        return sigmoid_bce_loss(logits, labels), dice_loss(logits, labels)

    def matched_mask_losses(
        self, masks: Tensor, picks: list[tuple[int, int, Tensor, Tensor]], targets: list
    ) -> tuple[Tensor, Tensor]:
        """(BCE sum, Dice sum) of the picked predictions, read from ``masks`` in one index.

        ``masks`` [N, V, Q, h, w]; ``picks``: ``(n, v, queries, rows)``, the query indices of
        image n in view v and the rows of ``targets[n][v]["masks"]`` they are matched to.
        """
        if not picks:  # keeps the mask head in the graph when nothing matches
            zero = masks.sum() * 0.0
            return zero, zero
        queries = torch.cat([q for _, _, q, _ in picks])
        images = torch.cat([torch.full_like(q, n) for n, _, q, _ in picks])
        views = torch.cat([torch.full_like(q, v) for _, v, q, _ in picks])
        blocks = [(targets[n][v]["masks"], rows) for n, v, _, rows in picks]
        return self.mask_losses(masks[images, views, queries], blocks)  # [K, h, w]

    def num_masks(self, targets: list[list[dict]], device: torch.device) -> Tensor:
        """The mask-loss normaliser of this level (shared by the final and aux predictions)."""
        raise NotImplementedError

    def terms(self, prediction: dict, targets: list[list[dict]], num_masks: Tensor) -> Tensor:
        """Unweighted (CE, BCE, Dice) of one prediction -> [3]."""
        raise NotImplementedError

    def forward(self, prediction: dict, targets: list[list[dict]]) -> dict[str, Tensor]:
        """Weighted CE / BCE / Dice, each summed over the final and the aux predictions."""
        device = prediction["logits"].device
        num_masks = self.num_masks(targets, device)
        weights = [self.class_weight, self.mask_weight, self.dice_weight]
        weights = torch.tensor(weights, device=device)
        predictions = [prediction, *(prediction.get("aux") or [])]
        total = sum(self.terms(p, targets, num_masks) for p in predictions) * weights  # [3]
        return {f"{self.level}/{name}": total[i] for i, name in enumerate(("ce", "bce", "dice"))}


class ImageLevelLoss(_SetLoss):
    """L_i: entity scores U_i^e and masks U_i^m of the image queries Q_i, per image and view.

    The targets of view v are the entities visible in it (non-empty mask).
    """

    level = "image"

    def num_masks(self, targets: list[list[dict]], device: torch.device) -> Tensor:
        visible = sum(int(t["masks"].flatten(1).any(1).sum()) for views in targets for t in views)
        return num_target_masks(visible, device)

    def terms(self, prediction: dict, targets: list[list[dict]], num_masks: Tensor) -> Tensor:
        logits, masks = prediction["logits"], prediction["masks"]  # [N, V, Q, 2], [N, V, Q, h, w]
        matches = self.matcher.match_image_level(logits, masks, targets)
        matched = torch.zeros(logits.shape[:3], dtype=torch.bool, device=logits.device)
        picks = []  # (n, v, query indices, target rows) of every matched pair
        for n, per_view in enumerate(matches):
            for v, (query_idx, target_idx) in enumerate(per_view):
                matched[n, v, query_idx] = True
                if query_idx.numel():
                    picks.append((n, v, query_idx, target_idx))
        bce, dice = self.matched_mask_losses(masks, picks, targets)
        ce = self.entity_ce(logits, matched)
        return torch.stack([ce, bce / num_masks, dice / num_masks])


class BatchLevelLoss(_SetLoss):
    """L_b: entity scores U_b^e and masks U_b^m of the batch queries Q_b against G_b.

    One problem per image; a query's score is shared by all views (view 0's is used) and its
    mask in every view is supervised by the entity's mask in that view (empty or not).
    """

    level = "batch"

    def num_masks(self, targets: list[list[dict]], device: torch.device) -> Tensor:
        return num_target_masks(sum(int(views[0]["masks"].shape[0]) for views in targets), device)

    def terms(self, prediction: dict, targets: list[list[dict]], num_masks: Tensor) -> Tensor:
        logits, masks = prediction["logits"], prediction["masks"]  # [N, V, Q, 2], [N, V, Q, h, w]
        matches = self.matcher.match_batch_level(logits, masks, targets)
        matched = torch.zeros(logits[:, 0].shape[:2], dtype=torch.bool, device=logits.device)
        picks = []  # each matched entity in every view (its empty views included)
        for n, (query_idx, target_idx) in enumerate(matches):
            matched[n, query_idx] = True
            if query_idx.numel():
                picks += [(n, v, query_idx, target_idx) for v in range(masks.shape[1])]
        bce, dice = self.matched_mask_losses(masks, picks, targets)
        ce = self.entity_ce(logits[:, 0], matched)  # one score per query: [N, Q, 2]
        return torch.stack([ce, bce / num_masks, dice / num_masks])


class CropFormerCriterion(nn.Module):
    """L = image_level_weight * L_i + batch_level_weight * L_b (0.5 and 1.0 as released).

    ``forward(outputs, targets)``: ``outputs["image"]`` and ``outputs["batch"]`` are
    ``{"logits": [N, V, Q, 2], "masks": [N, V, Q, h, w], "aux": [...]}``; ``targets[n][v]`` is
    ``{"masks": bool[M, H, W], "ids": long[M]}`` with H, W = 4h, 4w. Returns ``"loss"`` and the
    weighted terms ``"image/ce"``, ``"image/bce"``, ``"image/dice"``, ``"batch/ce"``,
    ``"batch/bce"``, ``"batch/dice"``. Without a batch decoder (``outputs["batch"]`` None,
    the Mask2Former baseline) there are no batch terms and ``loss`` is the image-level sum at
    full weight, not scaled by ``image_level_weight``.
    """

    def __init__(
        self,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_entity_weight: float = 0.1,
        num_points: int | None = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        image_level_weight: float = 0.5,
        batch_level_weight: float = 1.0,
    ) -> None:
        super().__init__()
        matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        settings = dict(
            matcher=matcher,
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_entity_weight=no_entity_weight,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )
        self.image_level = ImageLevelLoss(**settings)
        self.batch_level = BatchLevelLoss(**settings)
        self.image_level_weight = image_level_weight
        self.batch_level_weight = batch_level_weight

    def forward(self, outputs: dict, targets: list[list[dict]]) -> dict[str, Tensor]:
        device_type = outputs["image"]["logits"].device.type
        with torch.autocast(device_type, enabled=False):  # float32 losses under bf16-mixed
            return self._losses(outputs, targets)

    def _losses(self, outputs: dict, targets: list[list[dict]]) -> dict[str, Tensor]:
        losses = self.image_level(outputs["image"], targets)
        image_total = sum(losses.values())
        if outputs.get("batch") is None:
            return {"loss": image_total, **losses}
        losses.update(self.batch_level(outputs["batch"], targets))
        batch_total = sum(v for k, v in losses.items() if k.startswith("batch/"))
        total = self.image_level_weight * image_total + self.batch_level_weight * batch_total
        return {"loss": total, **losses}
