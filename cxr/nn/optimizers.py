"""The study's five optimizers, written to give the same numbers as keras.optimizers.

Each update follows Keras 3's ``update_step`` operation by operation (same order, same float32
scalars, same defaults), so a step from equal weights and gradients gives equal weights. State
(momenta, accumulators) lives in ``self.state`` keyed by the parameter's name; updates are in
place on the parameter array, with per-parameter scratch arrays so a step allocates nothing.
"""

from __future__ import annotations

import numpy as np


class Optimizer:
    """Base class: ``step([(key, param, grad), ...])`` updates every param in place."""

    def __init__(self, learning_rate: float):
        self.learning_rate = float(learning_rate)
        self.iterations = 0  # completed steps, like keras' optimizer.iterations
        self.state: dict[str, dict[str, np.ndarray]] = {}
        self._buffers: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def step(self, items) -> None:
        for key, param, grad in items:
            if param.shape != grad.shape:
                raise ValueError(f"{key}: gradient shape {grad.shape} != parameter shape {param.shape}")
            self.update(key, param, grad)
        self.iterations += 1

    def update(self, key: str, param: np.ndarray, grad: np.ndarray) -> None:
        raise NotImplementedError

    def _slot(self, key, name, like, fill=0.0):
        slots = self.state.setdefault(key, {})
        if name not in slots:
            slots[name] = np.full_like(like, fill)
        return slots[name]

    def _scratch(self, key, like):
        # Two reusable work arrays per parameter: allocating fresh temporaries the size of a big
        # kernel every step costs more (page faults) than the arithmetic itself.
        bufs = self._buffers.get(key)
        if bufs is None or bufs[0].shape != like.shape or bufs[0].dtype != like.dtype:
            bufs = self._buffers[key] = (np.empty_like(like), np.empty_like(like))
        return bufs

    def _lr(self, dtype):
        return dtype.type(self.learning_rate)

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate}

    def __repr__(self):
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({cfg})"


class SGD(Optimizer):
    """Plain, momentum or Nesterov SGD (Keras: m = m*mu - lr*g; w += m)."""

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False):
        super().__init__(learning_rate)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError("momentum must be in [0, 1]")
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def update(self, key, param, grad):
        lr = self._lr(param.dtype)
        b1, b2 = self._scratch(key, param)
        np.multiply(grad, lr, out=b1)  # lr * g
        if self.momentum == 0:
            param -= b1
            return
        mu = param.dtype.type(self.momentum)
        m = self._slot(key, "momentum", param)
        m *= mu
        m -= b1
        if self.nesterov:
            np.multiply(m, mu, out=b2)
            b2 -= b1
            param += b2
        else:
            param += m

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adagrad(Optimizer):
    """Per-weight step sizes shrinking with the summed squared gradient (accumulator starts at 0.1)."""

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7):
        super().__init__(learning_rate)
        self.initial_accumulator_value = float(initial_accumulator_value)
        self.epsilon = float(epsilon)

    def update(self, key, param, grad):
        acc = self._slot(key, "accumulator", param, self.initial_accumulator_value)
        b1, b2 = self._scratch(key, param)
        np.square(grad, out=b1)
        acc += b1
        np.multiply(grad, self._lr(param.dtype), out=b1)
        np.add(acc, param.dtype.type(self.epsilon), out=b2)
        np.sqrt(b2, out=b2)
        b1 /= b2
        param -= b1

    def get_config(self):
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value,
                "epsilon": self.epsilon}


class Adadelta(Optimizer):
    """Step = RMS(past updates) / RMS(gradients) * g, scaled by learning_rate as Keras does."""

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7):
        super().__init__(learning_rate)
        self.rho = float(rho)
        self.epsilon = float(epsilon)

    def update(self, key, param, grad):
        t = param.dtype.type
        rho, one_m_rho, eps = t(self.rho), t(1 - self.rho), t(self.epsilon)
        acc_g = self._slot(key, "accumulated_grad", param)
        acc_d = self._slot(key, "accumulated_delta_var", param)
        delta, b2 = self._scratch(key, param)
        acc_g *= rho
        np.square(grad, out=b2)
        b2 *= one_m_rho
        acc_g += b2
        np.add(acc_d, eps, out=delta)  # delta = -sqrt(acc_d + eps) * g / sqrt(acc_g + eps)
        np.sqrt(delta, out=delta)
        delta *= grad
        np.add(acc_g, eps, out=b2)
        np.sqrt(b2, out=b2)
        delta /= b2
        np.negative(delta, out=delta)
        acc_d *= rho
        np.square(delta, out=b2)
        b2 *= one_m_rho
        acc_d += b2
        delta *= self._lr(param.dtype)
        param += delta

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "epsilon": self.epsilon}


class RMSprop(Optimizer):
    """g / sqrt(moving mean of g^2); optional momentum and centring, as in Keras."""

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False):
        super().__init__(learning_rate)
        self.rho = float(rho)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.centered = bool(centered)

    def update(self, key, param, grad):
        t = param.dtype.type
        rho, one_m_rho, eps = t(self.rho), t(1 - self.rho), t(self.epsilon)
        vel = self._slot(key, "velocity", param)
        inc, denom = self._scratch(key, param)
        vel *= rho
        np.square(grad, out=denom)
        denom *= one_m_rho
        vel += denom
        if self.centered:
            avg = self._slot(key, "average_gradient", param)
            avg *= rho
            np.multiply(grad, one_m_rho, out=denom)
            avg += denom
            np.square(avg, out=denom)
            np.subtract(vel, denom, out=denom)
            denom += eps
        else:
            np.add(vel, eps, out=denom)
        np.multiply(grad, self._lr(param.dtype), out=inc)
        np.sqrt(denom, out=denom)
        inc /= denom
        if self.momentum > 0:
            mom = self._slot(key, "momentum", param)
            mom *= t(self.momentum)
            mom += inc
            param -= mom
        else:
            param -= inc

    def get_config(self):
        return {**super().get_config(), "rho": self.rho, "momentum": self.momentum,
                "epsilon": self.epsilon, "centered": self.centered}


class Adam(Optimizer):
    """Adam with Keras' epsilon placement: w -= m * alpha / (sqrt(v) + eps), bias correction in alpha."""

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False):
        super().__init__(learning_rate)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.amsgrad = bool(amsgrad)

    def update(self, key, param, grad):
        t = param.dtype.type
        step = t(self.iterations + 1)
        b1p = t(self.beta_1) ** step
        b2p = t(self.beta_2) ** step
        alpha = self._lr(param.dtype) * np.sqrt(t(1) - b2p) / (t(1) - b1p)
        m = self._slot(key, "momentum", param)
        v = self._slot(key, "velocity", param)
        b1, b2 = self._scratch(key, param)
        np.subtract(grad, m, out=b1)  # m += (g - m) * (1 - beta_1)
        b1 *= t(1 - self.beta_1)
        m += b1
        np.square(grad, out=b1)  # v += (g^2 - v) * (1 - beta_2)
        b1 -= v
        b1 *= t(1 - self.beta_2)
        v += b1
        if self.amsgrad:
            v_hat = self._slot(key, "velocity_hat", param)
            np.maximum(v_hat, v, out=v_hat)
            v = v_hat
        np.multiply(m, alpha, out=b2)
        np.sqrt(v, out=b1)
        b1 += t(self.epsilon)
        b2 /= b1
        param -= b2

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, "amsgrad": self.amsgrad}


OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "adadelta": Adadelta, "rmsprop": RMSprop, "adam": Adam}


def get(optimizer, **kwargs) -> Optimizer:
    """An Optimizer from an instance or a name ('adam', 'sgd', ...) plus keyword arguments."""
    if isinstance(optimizer, Optimizer):
        if kwargs:
            raise ValueError("keyword arguments only apply when the optimizer is given by name")
        return optimizer
    try:
        return OPTIMIZERS[str(optimizer).lower()](**kwargs)
    except KeyError:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZERS)}") from None
