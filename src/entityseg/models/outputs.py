"""What the network returns: typed, documented outputs (in the manner of HF's ``ModelOutput``).

:meth:`CropFormer.forward <entityseg.models.cropformer.CropFormer.forward>` returns a
:class:`CropFormerOutput`: one :class:`DecoderOutput` per decoder, the image-level decoder
(queries Q_i, every view decoded on its own) and the batch-level decoder (queries Q_b shared by
all views of an image). Each holds the paper's U^e (entity logits) and U^m (mask logits) of its
final prediction, and of the earlier decoder layers for deep supervision.

Layout, whichever decoder: ``[N, V, Q, ...]``, N images, V views (view 0 the full image I^O,
views 1.. its crops I^C), Q queries; masks at stride 4 of the (padded) network input
``[N, V, 3, H, W]``. The decoders' per-layer predictions become this layout in their own
modules, each in one function (:func:`entityseg.models.image_decoder.image_level_output`,
:func:`entityseg.models.batch_decoder.broadcast_to_views`), and :meth:`DecoderOutput.from_layers`
makes the final prediction and its ``aux`` from the list of layers.

Plain dataclasses: fields are attributes, nothing is indexed by a string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

#: The names of :meth:`CropFormerOutput.to_tuple`'s tensors, in its order (the exported graph's
#: output names, :mod:`entityseg.inference.exported`); the ``batch_*`` two only with a batch
#: decoder's output.
TUPLE_NAMES = ("image_logits", "image_masks", "batch_logits", "batch_masks")


@dataclass(frozen=True, eq=False)
class DecoderOutput:
    """One decoder's predictions: U^e and U^m of the final layer, the earlier layers in ``aux``.

    Attributes:
        logits: ``float[N, V, Q, 2]``, entity logits U^e (softmax index 0 entity, 1 no-entity).
            The batch-level decoder's are one score per batch query, the same in every view
            (an ``expand``, not a copy).
        masks: ``float[N, V, Q, H/4, W/4]``, mask logits U^m of every query in every view, or
            None: the ``aux`` predictions of a network in eval mode carry logits only (no
            intermediate stride-4 masks are made at inference). A final prediction always has
            masks.
        aux: the earlier decoder layers' predictions (deep supervision), oldest first: the
            prediction on the learnable queries, then after layers 1 .. L - 1 (their own
            ``aux`` empty). Empty for exported networks.
    """

    logits: torch.Tensor
    masks: torch.Tensor | None
    aux: list[DecoderOutput] = field(default_factory=list)

    @classmethod
    def from_layers(cls, layers: Sequence[DecoderOutput]) -> DecoderOutput:
        """A decoder's output from its per-layer predictions, oldest first: the last is the
        final prediction, the earlier ones (deep supervision) its ``aux``."""
        *aux, final = layers
        return cls(final.logits, final.masks, list(aux))

    def float(self) -> DecoderOutput:
        """The final ``logits`` and ``masks`` in float32 (bf16 under autocast); ``aux`` as is.

        Tensors that are float32 already are returned as they are (no copy).
        """
        masks = None if self.masks is None else self.masks.float()
        return replace(self, logits=self.logits.float(), masks=masks)


@dataclass(frozen=True, eq=False)
class CropFormerOutput:
    """The network's outputs for images ``[N, V, 3, H, W]``.

    Attributes:
        image: the image-level decoder (queries Q_i): every view decoded on its own, U_i^e and
            U_i^m.
        batch: the batch-level decoder (queries Q_b, shared by all V views of an image): U_b^e
            and U_b^m; None for the Mask2Former baseline (no association module) and for
            ``forward(images, batch_level=False)``.
    """

    image: DecoderOutput
    batch: DecoderOutput | None = None

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """The final tensors, flat, in the order of :data:`TUPLE_NAMES`.

        ``(image.logits, image.masks)``, then ``(batch.logits, batch.masks)`` when there is a
        batch-level output: 2 or 4 tensors, no ``aux``. What an exported graph returns
        (``entityseg.export``).
        """
        final = (self.image.logits, self.image.masks)
        if self.batch is None:
            return final
        return (*final, self.batch.logits, self.batch.masks)

    def float(self) -> CropFormerOutput:
        """Both decoders' final ``logits`` and ``masks`` in float32 (:meth:`DecoderOutput.float`):
        inference fuses float32 whatever precision the network ran in."""
        batch = None if self.batch is None else self.batch.float()
        return CropFormerOutput(self.image.float(), batch)
