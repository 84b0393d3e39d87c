"""Small models built to exercise one behaviour each (importable as tests.models:NAME)."""
import torch
from torch import nn


class Tiny(nn.Module):
    """A plain MLP classifier."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


class Branchy(nn.Module):
    """Data-dependent control flow that torch.jit.script handles and a trace gets wrong."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        if bool(x.sum() > 0):
            return self.lin(x)
        return self.lin(-x) * 2.0


class Unscriptable(nn.Module):
    """Data-dependent control flow in code TorchScript cannot compile: no faithful TorchScript exists."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        branch = {True: lambda t: self.lin(t), False: lambda t: self.lin(-t) * 2.0}
        return branch[bool(x.sum() > 0)](x)


class Broken(nn.Module):
    """Fails on any input."""

    def forward(self, x):
        raise ValueError("this model is broken on purpose")


class TwoHeads(nn.Module):
    """Two inputs, a dict of two outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x, y):
        return {"sum": self.a(x) + self.b(y), "diff": self.a(x) - self.b(y)}


def tiny_factory():
    return Tiny()


NOT_A_MODEL = 42


class Slow(nn.Module):
    """Doubles its input after sleeping ``delay`` seconds per batch: a stand-in for a heavy model.

    Its pace can also be set by the test (``tests._server.Gate``): while the file named by ``$TORCHSHIP_TEST_GATE``
    exists, each batch first writes ``pid size`` to that name + ``.held`` and then waits until the file is gone. So a
    test of queues, deadlines, drains and dead workers waits on events it controls, not on this machine's speed."""

    example_inputs = ["x:float32[batch,4]"]
    delay = 0.02

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        import os
        import time
        time.sleep(self.delay)
        gate = os.environ.get("TORCHSHIP_TEST_GATE")
        if gate and os.path.exists(gate):
            with open(gate + ".held", "a") as f:
                f.write(f"{os.getpid()} {x.shape[0]}\n")
            while os.path.exists(gate):
                time.sleep(0.002)
        return x * self.scale


class Amplify(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Overflow(nn.Module):
    """Finite until ``square``, which overflows float32 (1e25 squared): the NaN tracer must name it."""

    example_inputs = ["x:float32[batch,4]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.amp = Amplify(1e25)
        self.square = Square()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.square(self.amp(self.lin(x))))


class WithDropout(nn.Module):
    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.lin(x))))


def dropout_in_eval():
    return WithDropout().eval()


def frozen_tiny():
    return Tiny().requires_grad_(False).eval()


class NoBatchGain(nn.Module):
    """A 256x256 matrix product per item (batched as bmm): its cost grows with the batch, so batching gains
    nothing. Frozen and traceable: a model with none of the mistakes `check` looks for."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(256, 256) / 16)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        h = x.sum(1)[:, None, None] * self.w
        for _ in range(3):
            h = h @ self.w
        return h.mean(1)[:, :4]


class Noisy(nn.Module):
    """Adds fresh noise on every call: no variant can match the reference, whatever the runtime."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x) + torch.randn(x.shape[0], 4)


class ValueLoop(nn.Module):
    """A loop on a tensor's value: repeats y = 1.5 y + 0.1 while mean |y| < 4. An exporter that traces it unrolls the
    loop as many times as the example input needed; other inputs need another count."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        while y.abs().mean() < 4:
            y = y * 1.5 + 0.1
        return y


class SmallVocab(nn.Module):
    """An embedding of 50 rows: ids must lie in [0, 50)."""

    example_inputs = ["ids:int64[batch,seq]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


class Lstm(nn.Module):
    """A one-layer LSTM over a sequence, the last hidden state out: a dynamic sequence length through export."""

    example_inputs = ["x:float32[batch,seq,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Hang(Slow):
    """Slow, and never answers (sleeps ``hang`` seconds) when the first value is 12345: a model that hangs. With
    ``$TORCHSHIP_TEST_GATE`` set, a batch that hangs first says so in that name + ``.held``, as ``Slow`` does."""

    hang = 120.0

    def forward(self, x):
        import os
        import time
        if float(x.reshape(-1)[0]) == 12345.0:
            if os.environ.get("TORCHSHIP_TEST_GATE"):
                with open(os.environ["TORCHSHIP_TEST_GATE"] + ".held", "a") as f:
                    f.write(f"{os.getpid()} {x.shape[0]}\n")
            time.sleep(self.hang)
        return super().forward(x)


class RareRescale(nn.Module):
    """A loop on a tensor's value in a branch that ordinary inputs never take: activations past 1,000 are halved until
    they are not (the model of issue 31). A trace of an ordinary input keeps no loop at all."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        while h.abs().max() > 1000:
            h = h / 2
        return h


class NegativeMean(nn.Module):
    """A branch taken only for inputs whose mean is below -1 (generated inputs have a mean near 0)."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        if x.mean() < -1:
            return self.lin(-x) * 3.0
        return self.lin(x)


class ShapeBranch(nn.Module):
    """A branch on a shape, not on values: every input of the spec takes the same path."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[-1] == 8:
            return self.lin(x)
        return self.lin(x[..., :8])


class PackedGru(nn.Module):
    """A GRU over padded sequences that takes each one's length (pack_padded_sequence), the usual way to run RNNs
    on padded batches; its lengths are bounded by the sequence dimension."""

    example_inputs = ["x:float32[batch,seq,16]", "lengths:int64[batch]{1:seq+1}"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.GRU(16, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.head(h[-1])


class PackedLstm(PackedGru):
    """The same with an LSTM."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(16, 32, batch_first=True)

    def forward(self, x, lengths):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


class CondBranch(nn.Module):
    """A branch on values written with torch.cond: an export keeps both sides, so nothing is specialized."""

    example_inputs = ["x:float32[batch,8]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return torch.cond(x.mean() < -1, lambda t: self.lin(-t) * 3.0, lambda t: self.lin(t), (x,))


class Outlier(nn.Module):
    """An MLP whose first layer ignores its first input: where the data carry an outlier there (300x the others, as
    transformers' activations have), static int8 puts that input on one scale with the rest and loses them, in the
    first layer alone; the other layers quantize well."""

    example_inputs = ["x:float32[batch,32]"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 16)
        with torch.no_grad():
            self.a.weight[:, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def outlier_data(items: int = 256, seed: int = 0) -> dict:
    """Inputs for ``Outlier``: normal, the first 300x the others."""
    import numpy as np
    x = np.random.default_rng(seed).standard_normal((items, 32)).astype(np.float32)
    x[:, 0] *= 300
    return {"x": x}
