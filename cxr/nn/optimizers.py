"""The study's five optimizers, written to give the same numbers as keras.optimizers.

Each update follows Keras 3's ``update_step`` operation by operation (same order, same float32
scalars, same defaults), so a step from equal weights and gradients gives equal weights. State
(momenta, accumulators) lives in ``self.state`` keyed by the parameter's name; updates are in
place on the parameter array and reuse scratch arithmetic to keep allocation per step low.
"""

from __future__ import annotations

import numpy as np


class Optimizer:
    """Base class: ``step([(key, param, grad), ...])`` updates every param in place."""

    def __init__(self, learning_rate: float):
        self.learning_rate = float(learning_rate)
        self.iterations = 0  # completed steps, like keras' optimizer.iterations
        self.state: dict[str, dict[str, np.ndarray]] = {}

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
        if self.momentum == 0:
            param -= grad * lr
            return
        mu = param.dtype.type(self.momentum)
        m = self._slot(key, "momentum", param)
        m *= mu
        m -= grad * lr
        if self.nesterov:
            param += m * mu - grad * lr
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
        acc += np.square(grad)
        step = self._lr(param.dtype) * grad
        step /= np.sqrt(acc + param.dtype.type(self.epsilon))
        param -= step

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
        acc_g *= rho
        acc_g += one_m_rho * np.square(grad)
        delta = np.sqrt(acc_d + eps) * grad
        delta /= np.sqrt(acc_g + eps)
        np.negative(delta, out=delta)
        acc_d *= rho
        acc_d += one_m_rho * np.square(delta)
        param += self._lr(param.dtype) * delta

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
        vel *= rho
        vel += one_m_rho * np.square(grad)
        if self.centered:
            avg = self._slot(key, "average_gradient", param)
            avg *= rho
            avg += one_m_rho * grad
            denom = vel - np.square(avg)
            denom += eps
        else:
            denom = vel + eps
        inc = self._lr(param.dtype) * grad
        inc /= np.sqrt(denom)
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
        d = grad - m
        d *= t(1 - self.beta_1)
        m += d
        d = np.square(grad)
        d -= v
        d *= t(1 - self.beta_2)
        v += d
        if self.amsgrad:
            v_hat = self._slot(key, "velocity_hat", param)
            np.maximum(v_hat, v, out=v_hat)
            v = v_hat
        upd = m * alpha
        den = np.sqrt(v)
        den += t(self.epsilon)
        upd /= den
        param -= upd

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
