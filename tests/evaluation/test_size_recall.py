import json

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

from entityseg.evaluation.size_recall import recall_by_area


def test_recall_by_area(tmp_path):
    masks = np.zeros((3, 40, 40), np.uint8)
    masks[0, :4, :4] = 1  # 16 px: tiny
    masks[1, 10:20, 10:20] = 1  # 100 px
    masks[2, 20:40, 20:40] = 1  # 400 px
    anns = []
    for i, m in enumerate(masks, start=1):
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        anns.append(
            {
                "id": i,
                "image_id": 1,
                "category_id": 1,
                "segmentation": rle,
                "area": int(m.sum()),
                "bbox": [0, 0, 1, 1],
                "iscrowd": 0,
            }
        )
    data = {
        "images": [{"id": 1, "height": 40, "width": 40, "file_name": "a.png"}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "entity"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(data))
    gt = COCO(str(tmp_path / "gt.json"))
    found = {
        1: [{"segmentation": anns[2]["segmentation"]}, {"segmentation": anns[0]["segmentation"]}]
    }
    recall, total = recall_by_area(gt, found, bins=(0, 50, 200, 1000))
    assert total.tolist() == [1, 1, 1]
    assert recall.tolist() == [1.0, 0.0, 1.0]
    recall, _ = recall_by_area(gt, {}, bins=(0, 50, 200, 1000))
    assert recall.tolist() == [0.0, 0.0, 0.0]
