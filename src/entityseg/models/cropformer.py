"""CropFormer: backbone -> pixel decoder -> image decoder (+ association -> batch decoder).

Input I ``[N, V, 3, H, W]``: view 0 the full image I^O, views 1.. its crops I^C, normalised and
zero-padded by the data pipeline (``entityseg.data``). All N x V views go through the backbone
and the pixel decoder (Theta(I)) and the image-level decoder Phi_i independently (E_i
``[N, V, Q, C]``, ``image_decoder.py``); the association module turns them into batch queries
Q_b (``association.py``), which the batch-level decoder Phi_b decodes over all views of an
image at once (``batch_decoder.py``). The output is a
:class:`~entityseg.models.outputs.CropFormerOutput`.

With ``association.enabled=false`` the model is the single-scale Mask2Former baseline (Image-O);
``forward(images, batch_level=False)`` skips the batch path of a CropFormer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from entityseg.models.association import AssociationModule
from entityseg.models.backbone import TimmBackbone
from entityseg.models.batch_decoder import decode_batch
from entityseg.models.image_decoder import MaskedAttentionDecoder, image_level_output
from entityseg.models.outputs import CropFormerOutput, DecoderOutput
from entityseg.models.pixel_decoder import MSDeformAttnPixelDecoder


class CropFormer(nn.Module):
    """The whole network of the paper, built from the ``conf/model`` blocks.

    Args:
        backbone: :class:`TimmBackbone` arguments (``name``, ``pretrained``, ...).
        pixel_decoder: :class:`MSDeformAttnPixelDecoder` arguments.
        decoder: :class:`MaskedAttentionDecoder` arguments (image-level decoder).
        association: ``enabled`` (false: Mask2Former baseline), ``share_decoder`` (the batch
            decoder reuses the image decoder's weights, as released) and
            :class:`AssociationModule` arguments (``xatt``, ``satt``, ``ffn``, ...).
    """

    def __init__(
        self,
        backbone: Mapping,
        pixel_decoder: Mapping,
        decoder: Mapping,
        association: Mapping,
    ) -> None:
        super().__init__()
        # saved in checkpoints (models.checkpoint.NET_CONFIG_KEY): rebuilds this network
        self.config = {
            "backbone": dict(backbone),
            "pixel_decoder": dict(pixel_decoder),
            "decoder": dict(decoder),
            "association": dict(association),
        }
        self.backbone = TimmBackbone(**backbone)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels=self.backbone.channels, in_strides=self.backbone.strides, **pixel_decoder
        )
        decoder_args = dict(
            in_channels=pixel_decoder.get("conv_dim", 256),
            mask_dim=pixel_decoder.get("mask_dim", 256),
            **decoder,
        )
        self.image_decoder = MaskedAttentionDecoder(**decoder_args)
        assoc = dict(association)
        enabled = assoc.pop("enabled", True)
        share = assoc.pop("share_decoder", True)
        hidden = self.image_decoder.hidden_dim
        self.association = AssociationModule(hidden, **assoc) if enabled else None
        self.batch_decoder = (
            MaskedAttentionDecoder(**decoder_args) if enabled and not share else None
        )

    @property
    def has_batch_decoder(self) -> bool:
        return self.association is not None

    def compile_parts(self, **options) -> None:
        """``torch.compile`` the backbone and the pixel decoder in place (``model.compile``).

        ``nn.Module.compile`` keeps the modules and their parameter names, so the state dict
        and checkpoints are the same as eager ones (``torch.compile(module)`` would prefix
        ``_orig_mod.``). ``options`` go to ``torch.compile`` (e.g. ``backend="aot_eager"``).
        The image and batch decoders and the association module stay eager.
        """
        self.backbone.compile(**options)
        self.pixel_decoder.compile(**options)

    def forward(
        self, images: torch.Tensor, batch_level: bool = True, view_chunk: int | None = None
    ) -> CropFormerOutput:
        """``images [N, V, 3, H, W]`` -> :class:`CropFormerOutput` (``image``, ``batch``).

        ``view_chunk``: run the backbone and the pixel decoder on this many of the N x V views
        at a time (each view is independent there), so that their activations, which dominate
        the peak memory of inference on many large views, exist for a few views only. The
        result is the same (to float rounding); None runs all views at once.

        Each :class:`~entityseg.models.outputs.DecoderOutput` has ``logits [N, V, Q, 2]``,
        ``masks [N, V, Q, H/4, W/4]`` (the final prediction) and ``aux``: the earlier
        predictions (deep supervision), oldest first. The batch decoder's logits are one score
        per query, repeated for every view. ``batch`` is None without the batch-level path
        (the Mask2Former baseline) or with ``batch_level=False``.
        """
        n, v = images.shape[:2]
        mask_features, multi_scale = self._pixel_features(images.flatten(0, 1), view_chunk)
        image_predictions, view_queries = self.image_decoder(multi_scale, mask_features)
        image = image_level_output(image_predictions, n)
        if not (batch_level and self.has_batch_decoder):
            return CropFormerOutput(image)
        batch = self.batch_level(view_queries, multi_scale, mask_features, v)
        return CropFormerOutput(image, batch)

    def batch_level(
        self,
        view_queries: torch.Tensor,
        multi_scale: list[torch.Tensor],
        mask_features: torch.Tensor,
        views: int,
    ) -> DecoderOutput:
        """Association (Q_b) + batch decoder (E_b, U_b^e, U_b^m) on the image decoder's outputs.

        ``view_queries`` E_i ``[N*V, Q, C]``, ``multi_scale`` and ``mask_features`` of the
        N x V views (views of an image adjacent). Returns the batch decoder's predictions in
        every view (:func:`~entityseg.models.batch_decoder.decode_batch`).
        """
        decoder = self.batch_decoder or self.image_decoder
        batch_queries = self.association(  # Q_b [N, Q, C]
            view_queries.reshape(-1, views, *view_queries.shape[1:]),
            self.image_decoder.query_embed.weight,
        )
        return decode_batch(decoder, batch_queries, multi_scale, mask_features, views)

    def _pixel_features(
        self, views: torch.Tensor, view_chunk: int | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Backbone + pixel decoder of ``views [B, 3, H, W]``, ``view_chunk`` views at a time."""
        if view_chunk is None or views.shape[0] <= view_chunk:
            return self.pixel_decoder(self.backbone(views))
        if view_chunk < 1:
            raise ValueError(f"view_chunk={view_chunk} must be >= 1 (or None)")
        parts = [self.pixel_decoder(self.backbone(chunk)) for chunk in views.split(view_chunk)]
        mask_features = torch.cat([mask for mask, _ in parts])
        levels = [torch.cat(level) for level in zip(*(memory for _, memory in parts), strict=True)]
        return mask_features, levels
