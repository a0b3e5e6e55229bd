"""Plain NumPy reference implementations the tests compare the JAX code against."""

import numpy as np


def conv2d_valid(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
    """NHWC x HWIO cross-correlation with no padding, by explicit sums over the kernel taps."""
    n, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    ho = (h - kh) // stride + 1
    wo = (wd - kw) // stride + 1
    out = np.zeros((n, ho, wo, cout), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
            out += np.einsum("nhwc,cd->nhwd", patch.astype(np.float64), w[i, j].astype(np.float64))
    return out


def pad_hw(x: np.ndarray, before: int, after: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))


def conv2d_same_stride1(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = w.shape[0]
    return conv2d_valid(pad_hw(x, (k - 1) // 2, k - 1 - (k - 1) // 2), w)


def batch_norm_train(x: np.ndarray, gamma=None, beta=None, eps: float = 1e-5) -> np.ndarray:
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
