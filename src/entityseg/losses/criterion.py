"""CropFormer's training loss, the paper's equation (7): L = 0.5 L_i + 1.0 L_b as released.

:meth:`CropFormerCriterion.losses` writes equation (7) out: the sum over the levels k in
{i, b} (image level, batch level) of CE + BCE + Dice, over every decoder layer's prediction
(deep supervision), with the term weights and the level weights. :class:`ImageLevelLoss` and
:class:`BatchLevelLoss` give one prediction's three terms L_k^ce, L_k^bce, L_k^dice.

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
from entityseg.models.outputs import CropFormerOutput, DecoderOutput

ENTITY, NO_ENTITY = 0, 1
#: The three terms of equation (7), in the order of :meth:`ImageLevelLoss.terms` and
#: :meth:`BatchLevelLoss.terms`.
TERMS = ("ce", "bce", "dice")


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
    """What both levels share: weights, matcher, weighted CE and point-sampled mask losses.

    ``level`` names the level in the loss keys (``"image"``, ``"batch"``); ``weights`` are the
    weights of the :data:`TERMS` (class, mask, dice).
    """

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

    @property
    def weights(self) -> list[float]:
        """The weights of the :data:`TERMS`: class (CE), mask (BCE), dice."""
        return [self.class_weight, self.mask_weight, self.dice_weight]

    def num_masks(self, targets: list[list[dict]], device: torch.device) -> Tensor:
        """The mask-loss normaliser of this level (shared by the final and aux predictions)."""
        raise NotImplementedError

    def terms(
        self, prediction: DecoderOutput, targets: list[list[dict]], num_masks: Tensor
    ) -> Tensor:
        """Unweighted (CE, BCE, Dice) of one prediction (its final tensors) -> [3]."""
        raise NotImplementedError


class ImageLevelLoss(_SetLoss):
    """L_i: entity scores U_i^e and masks U_i^m of the image queries Q_i, per image and view.

    The targets of view v are the entities visible in it (non-empty mask).
    """

    level = "image"

    def num_masks(self, targets: list[list[dict]], device: torch.device) -> Tensor:
        visible = sum(int(t["masks"].flatten(1).any(1).sum()) for views in targets for t in views)
        return num_target_masks(visible, device)

    def terms(
        self, prediction: DecoderOutput, targets: list[list[dict]], num_masks: Tensor
    ) -> Tensor:
        logits, masks = prediction.logits, prediction.masks  # [N, V, Q, 2], [N, V, Q, h, w]
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

    def terms(
        self, prediction: DecoderOutput, targets: list[list[dict]], num_masks: Tensor
    ) -> Tensor:
        logits, masks = prediction.logits, prediction.masks  # [N, V, Q, 2], [N, V, Q, h, w]
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

    ``forward(outputs, targets)``: ``outputs`` the network's
    :class:`~entityseg.models.outputs.CropFormerOutput` (``image`` and ``batch``, each with
    ``logits [N, V, Q, 2]``, ``masks [N, V, Q, h, w]`` and ``aux``); ``targets[n][v]`` is
    ``{"masks": bool[M, H, W], "ids": long[M]}`` with H, W = 4h, 4w. Returns ``"loss"`` and the
    weighted terms ``"image/ce"``, ``"image/bce"``, ``"image/dice"``, ``"batch/ce"``,
    ``"batch/bce"``, ``"batch/dice"`` (:meth:`losses`, equation (7)). Without a batch decoder
    (``outputs.batch`` None, the Mask2Former baseline) there are no batch terms and ``loss`` is
    the image-level sum at full weight, not scaled by ``image_level_weight``.
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

    def forward(self, outputs: CropFormerOutput, targets: list[list[dict]]) -> dict[str, Tensor]:
        device_type = outputs.image.logits.device.type
        with torch.autocast(device_type, enabled=False):  # float32 losses under bf16-mixed
            return self.losses(outputs, targets)

    def losses(self, outputs: CropFormerOutput, targets: list[list[dict]]) -> dict[str, Tensor]:
        """Equation (7) of the paper, with deep supervision and the released weights.

        The paper's L = sum over k in {i, b} of L_k^ce(U_k^e, G_k^e) + L_k^bce(U_k^m, G_k^m) +
        L_k^dice(U_k^m, G_k^m), as trained::

            L   = w_i L_i + w_b L_b                          w_i = 0.5, w_b = 1.0
            L_k = sum over layers l of  lambda_ce   L_k^ce(U_k^e[l], G_k^e)
                                      + lambda_bce  L_k^bce(U_k^m[l], G_k^m)
                                      + lambda_dice L_k^dice(U_k^m[l], G_k^m)

        with lambda_ce, lambda_bce, lambda_dice = ``class_weight``, ``mask_weight``,
        ``dice_weight`` (2, 5, 5), w_i, w_b = ``image_level_weight``, ``batch_level_weight``;
        the layers l are the final prediction and every ``aux`` one (deep supervision), each
        matched on its own (:meth:`ImageLevelLoss.terms`, :meth:`BatchLevelLoss.terms`). G_i:
        the entities visible in each view, G_b: every entity in all views. Without the batch
        level (Mask2Former) L = L_i at full weight.

        Returns ``"loss"`` (L) and the weighted ``"<level>/<term>"`` sums over the layers.
        """
        levels = [(self.image_level, outputs.image)]
        if outputs.batch is not None:
            levels.append((self.batch_level, outputs.batch))
        losses, level_sums = {}, []
        for loss, output in levels:  # k in {i, b}
            device = output.logits.device
            num_masks = loss.num_masks(targets, device)
            weights = torch.tensor(loss.weights, device=device)
            layers = [output, *output.aux]  # deep supervision: final, then earlier layers
            weighted = sum(loss.terms(p, targets, num_masks) for p in layers) * weights  # [3]
            terms = {f"{loss.level}/{name}": weighted[i] for i, name in enumerate(TERMS)}
            losses.update(terms)
            level_sums.append(sum(terms.values()))  # L_k: CE + BCE + Dice
        if outputs.batch is None:  # the Mask2Former baseline: L_i at full weight
            return {"loss": level_sums[0], **losses}
        image_sum, batch_sum = level_sums
        total = self.image_level_weight * image_sum + self.batch_level_weight * batch_sum
        return {"loss": total, **losses}
