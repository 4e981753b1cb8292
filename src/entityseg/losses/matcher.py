"""Hungarian matching of entity queries to ground-truth entities on point-sampled costs.

One matching problem pairs Q queries with M target entities, each seen in V views: query masks
[Q, V, h, w] against target masks [M, V, H, W]. Image level (per image and view) is the case
V = 1; batch level (per image, queries Q_b shared by all views) compares the points of all V
views at once, so an entity seen in only one view is matched by what the query predicts there.

Cost (as in Mask2Former / the CropFormer release), on ``num_points`` uniform random points shared
by all queries and targets of one problem and, at batch level, by all its views:
``class_weight * -p(entity) + mask_weight * BCE + dice_weight * Dice``, BCE being the mean over
the V * num_points sampled values. ``num_points=None`` uses every prediction pixel's centre
instead (:func:`~entityseg.losses.point_sampling.dense_points`): deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from entityseg.losses.point_sampling import dense_points, point_sample
from entityseg.models.outputs import DecoderOutput

#: (query indices, target indices), long tensors of equal length.
Match = tuple[Tensor, Tensor]


def pairwise_sigmoid_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean sigmoid BCE of every query against every target: [Q, P] x [M, P] -> [Q, M]."""
    positive = F.softplus(-logits)  # BCE(x, 1), [Q, P]
    negative = F.softplus(logits)  # BCE(x, 0), [Q, P]
    return (positive @ labels.T + negative @ (1.0 - labels).T) / logits.shape[1]


def pairwise_dice(logits: Tensor, labels: Tensor) -> Tensor:
    """1 - (2 sum(p t) + 1) / (sum p + sum t + 1) for every pair: [Q, P] x [M, P] -> [Q, M]."""
    probs = logits.sigmoid()
    numerator = 2.0 * probs @ labels.T
    denominator = probs.sum(-1)[:, None] + labels.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def batch_level_targets(view_targets: list[dict]) -> Tensor:
    """G_b of one image: the V per-view target dicts -> masks bool[M, V, H, W].

    Every entity of the image is one batch-level target made of its masks in all views (empty
    where a view does not show it), as the release's ``prepare_targets_3d`` builds them.
    """
    return torch.stack([target["masks"] for target in view_targets], dim=1)


def _empty_match(device: torch.device) -> Match:
    empty = torch.empty(0, dtype=torch.long, device=device)
    return empty, empty.clone()


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to entities (scipy ``linear_sum_assignment``).

    Use :meth:`match_image_level` / :meth:`match_batch_level` on a decoder's outputs, or
    ``matcher(prediction, targets, level)``, which calls one of them. Unmatched queries are
    no-entity. All methods run without gradients.
    """

    def __init__(
        self,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int | None = 12544,
    ) -> None:
        super().__init__()
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self,
        logits: Tensor,
        masks: Tensor,
        target_masks: Tensor,
        points: Tensor | None = None,
    ) -> Tensor:
        """Matching cost [Q, M] of one problem.

        ``logits`` [Q, 2] (entity, no-entity); ``masks`` [Q, V, h, w] mask logits; ``target_masks``
        [M, V, H, W] (bool or float); ``points`` [P, 2] normalised (x, y), by default
        ``num_points`` uniform random ones (every pixel centre of ``h x w`` when
        ``num_points`` is None), read in every view.
        """
        if points is None and self.num_points is None:
            points = dense_points(*masks.shape[-2:], device=masks.device)
        elif points is None:
            points = torch.rand(self.num_points, 2, device=masks.device)
        points = points[None]  # [1, P, 2]: one point set for every mask and view
        num_queries, num_targets = masks.shape[0], target_masks.shape[0]
        pred = point_sample(masks.flatten(0, 1)[None].float(), points)  # [1, Q*V, P]
        pred = pred.reshape(num_queries, -1)  # [Q, V*P]
        target_masks = target_masks.to(masks.device)
        target = torch.cat(  # [M, V*P], one view at a time to bound the float copy
            [point_sample(view[None].float(), points)[0] for view in target_masks.unbind(1)],
            dim=1,
        )
        entity_prob = logits.float().softmax(-1)[:, 0]  # [Q]
        return (
            self.class_weight * -entity_prob[:, None].expand(-1, num_targets)
            + self.mask_weight * pairwise_sigmoid_bce(pred, target)
            + self.dice_weight * pairwise_dice(pred, target)
        )

    @torch.no_grad()
    def match(
        self,
        logits: Tensor,
        masks: Tensor,
        target_masks: Tensor,
        points: Tensor | None = None,
    ) -> Match:
        """Minimum-cost assignment of one problem (shapes as in :meth:`cost_matrix`).

        Returns (query indices, target indices), min(Q, M) pairs sorted by query; empty when
        there are no targets.
        """
        if target_masks.shape[0] == 0:
            return _empty_match(masks.device)
        cost = self.cost_matrix(logits, masks, target_masks, points).cpu()
        rows, cols = linear_sum_assignment(cost.numpy())
        return (
            torch.as_tensor(rows, dtype=torch.long, device=masks.device),
            torch.as_tensor(cols, dtype=torch.long, device=masks.device),
        )

    @torch.no_grad()
    def match_image_level(
        self, logits: Tensor, masks: Tensor, targets: list[list[dict]]
    ) -> list[list[Match]]:
        """Per image n and view v, queries Q_i matched to the entities visible in that view.

        ``logits`` [N, V, Q, 2], ``masks`` [N, V, Q, h, w]; ``targets[n][v]["masks"]`` bool
        [M, H, W]. Target indices are rows of ``targets[n][v]["masks"]``; an entity whose mask
        is empty in view v is not a target of that view and is never matched there.
        """
        matches = []
        for n, view_targets in enumerate(targets):
            per_view = []
            for v, target in enumerate(view_targets):
                visible = target["masks"].flatten(1).any(1).nonzero().squeeze(1)  # [M_v]
                query_idx, target_idx = self.match(
                    logits[n, v], masks[n, v, :, None], target["masks"][visible, None]
                )
                per_view.append((query_idx, visible.to(query_idx.device)[target_idx]))
            matches.append(per_view)
        return matches

    @torch.no_grad()
    def match_batch_level(
        self, logits: Tensor, masks: Tensor, targets: list[list[dict]]
    ) -> list[Match]:
        """Per image n, batch queries Q_b matched to all M entities G_b over all views' points.

        ``logits`` [N, V, Q, 2] (the same in every view; view 0 is used), ``masks``
        [N, V, Q, h, w]. Target indices are entity rows (the same in every view).
        """
        return [
            self.match(
                logits[n, 0],
                masks[n].transpose(0, 1),  # [Q, V, h, w]
                batch_level_targets(view_targets),  # [M, V, H, W]
            )
            for n, view_targets in enumerate(targets)
        ]

    def forward(
        self, prediction: DecoderOutput, targets: list[list[dict]], level: str = "image"
    ) -> list[list[Match]] | list[Match]:
        """Match one prediction (its final ``logits`` and ``masks``); ``level`` is "image" or
        "batch"."""
        if level == "image":
            return self.match_image_level(prediction.logits, prediction.masks, targets)
        if level == "batch":
            return self.match_batch_level(prediction.logits, prediction.masks, targets)
        raise ValueError(f"level must be 'image' or 'batch', got {level!r}")
