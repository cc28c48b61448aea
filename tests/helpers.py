"""Small helpers several test files share (the test files import them as `helpers`)."""
import numpy as np
import torch


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


class ArrayDataset(torch.utils.data.Dataset):
    """The official data-set interface over an in-memory uint8 array [N, C, R, R], unlabelled."""

    def __init__(self, images):
        self.images = images
        self.name, self.resolution, self.num_channels = "array", images.shape[-1], images.shape[1]
        self.label_dim, self.has_labels = 0, False

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].copy(), np.zeros([0], dtype=np.float32)
