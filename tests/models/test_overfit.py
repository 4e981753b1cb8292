"""A tiny CropFormer overfits one synthetic image (network + losses + data together)."""

import pytest
import torch

from conftest import make_datamodule, tiny_model
from entityseg.data.synthetic import generate_dataset
from entityseg.losses.criterion import CropFormerCriterion
from entityseg.losses.matcher import HungarianMatcher


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("overfit")
    generate_dataset(root, num_images=1, seed=5, height=192, width=256, num_objects=3, num_small=4)
    dm = make_datamodule(root, batch_size=1, size_scale=0.1, flip_prob=0.0)
    dm.setup("fit")
    torch.manual_seed(0)  # the crop picked for the single batch
    return next(iter(dm.train_dataloader()))


@pytest.mark.slow
def test_tiny_cropformer_overfits_one_image(one_batch):
    torch.manual_seed(0)
    model = tiny_model(num_queries=16)
    criterion = CropFormerCriterion(num_points=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = one_batch["images"], one_batch["targets"]
    losses = []
    for _ in range(300):
        loss = criterion(model(images), targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"loss {first:.2f} -> {last:.2f}")
    assert last < first / 5, (first, last)

    # one batch query = one entity in both views: its masks agree with the targets of both
    model.eval()
    with torch.no_grad():
        batch = model(images).batch
    [(queries, entities)] = HungarianMatcher(num_points=4096).match_batch_level(
        batch.logits, batch.masks, targets
    )
    h, w = one_batch["image_sizes"][0].tolist()
    ious = []
    for q, m in zip(queries.tolist(), entities.tolist(), strict=True):
        for view in range(2):
            pred = batch.masks[0, view, q].sigmoid() > 0.5
            pred = torch.nn.functional.interpolate(pred[None, None].float(), scale_factor=4)[0, 0]
            gt = targets[0][view]["masks"][m]
            if gt.sum() > 20:
                union = (pred.bool() | gt)[:h, :w].sum()
                ious.append(((pred.bool() & gt)[:h, :w].sum() / union).item())
    print(f"mean IoU {sum(ious) / len(ious):.2f} over {len(ious)} entity-views")
    assert len(ious) >= 8 and sum(ious) / len(ious) > 0.65, ious


@pytest.mark.parametrize(
    ("xatt", "satt", "ffn"),
    [(True, False, False), (True, False, True), (True, True, False), (False, False, False)],
)
def test_association_variants_still_train(one_batch, xatt, satt, ffn):
    """Paper Table 9c rows (and everything off): the batch-level loss still falls."""
    torch.manual_seed(0)
    model = tiny_model(num_queries=16, xatt=xatt, satt=satt, ffn=ffn)
    criterion = CropFormerCriterion(num_points=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch_losses = []
    for _ in range(40):
        terms = criterion(model(one_batch["images"]), one_batch["targets"])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        batch_losses.append(sum(terms[f"batch/{k}"].item() for k in ("ce", "bce", "dice")))
    assert sum(batch_losses[-5:]) < 0.6 * sum(batch_losses[:5])
