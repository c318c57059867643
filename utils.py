"""Plumbing shared by every command, in the role of ConvNeXt's and DeiT's utils.py.

Command-line pieces (one-line errors, one --device flag, one model group and its resolver),
devices and distributed set-up, seeding and RNG state, atomic files and the background checkpoint
writer, interrupts, fault points for the reliability tests, wandb and figures. It imports nothing
else of the project, so a command pays only for what it uses: `predict.py --help` loads neither
scikit-learn nor matplotlib.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import difflib
import errno
import hashlib
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# --------------------------------------------------------------------------- command line


class CLIError(RuntimeError):
    """A mistake in a command's input: the command prints `prog: error: message`, no traceback."""

    exit_status = 1


class DeviceError(CLIError, ValueError):
    """A --device value this machine cannot honour; the message names the flag."""

    exit_status = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default (where it has one) and the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # `is`, not `in (None, False)`: a default of 0 equals False and is worth showing
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for every command: an error is one line (exit status 2, no usage block, which
    for train.py is 20 lines that bury the message); `check` validates ranges; `explicit` tells
    which flags the command line gave; `model_name` resolves the model group's flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.config_file: str | None = None  # the -c FILE that `expand_config` read
        self.from_config: set[str] = set()  # the dests it set that the command line did not

    def error(self, message: str):
        # A message that starts with a flag whose value came from -c FILE says so: the user did
        # not type it (train.py's rules and its resume rules name flags, not files).
        flag = re.match(r"--?[\w-]+", message)
        action = self._option_string_actions.get(flag.group()) if flag else None
        if action is not None and action.dest in self.from_config:
            message += f" (set by {self.config_file})"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def flag(self, dest: str) -> str:
        """The option string of `dest` ("gradient_accumulation_steps" -> "--gradient-...")."""
        return next(a.option_strings[0] for a in self._actions if a.dest == dest)

    def check(self, args: argparse.Namespace, rules: dict[str, tuple[str, Callable]]) -> None:
        """`rules`: dest -> (what the value must be, predicate). None values are not checked;
        a float must also be finite."""
        for dest, (requirement, ok) in rules.items():
            value = getattr(args, dest)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                self.error(f"{self.flag(dest)} {value}: must be a finite number")
            if not ok(value):
                self.error(f"{self.flag(dest)} {value}: must be {requirement}")

    def parse_checked(
        self, argv: list[str] | None, rules: dict[str, tuple[str, Callable]]
    ) -> argparse.Namespace:
        """parse_args (sys.argv when `argv` is None), then `check` with `rules`."""
        args = self.parse_args(argv)
        self.check(args, rules)
        return args

    def explicit(self, argv: list[str] | None) -> set[str]:
        """The dests that `argv` gives a value to (parsed again with every default suppressed)."""
        saved = [(a, a.default) for a in self._actions]
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            return set(vars(self.parse_args(argv)))
        finally:
            for action, default in saved:
                action.default = default

    def model_name(self, args: argparse.Namespace, default_size: str | None = None) -> str | None:
        """The model that --model / --model-size name (`add_model_arguments`): --model NAME, or
        emonext_SIZE; `default_size` when neither is given (None: the checkpoint decides)."""
        model, size = args.model, args.model_size
        if model and size and model != f"emonext_{size}":
            self.error(f"--model {model} and --model-size {size} name different models; give one")
        size = size or default_size
        return model or (f"emonext_{size}" if size else None)

    # ---- -c/--config FILE: flag values in a YAML file (docs/RECIPE.md)

    def expand_config(
        self, argv: list[str] | None, rules: dict[str, tuple[str, Callable]]
    ) -> list[str]:
        """`argv` (sys.argv when None) with `-c/--config FILE` replaced by the flags that FILE
        sets, put first so that the command line overrides them: timm's train.py, where a first
        parser reads -c and the file's keys (dest names: batch_size) become the defaults.

        Written out as flags, a file's values meet every check the command line's get, and count
        as given (`explicit`): --demo keeps them and --resume compares them with the run's. Each
        value is also converted and checked here (`rules` as in `check`), so that a mistake is one
        line naming the file, the key and what it accepts, before any work.
        """
        argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
        first = ArgumentParser(prog=self.prog, add_help=False)
        first.add_argument("-c", "--config", action="append", default=[])
        found, rest = first.parse_known_args(argv)
        if not found.config:
            return argv
        if len(found.config) > 1:
            self.error(f"-c/--config given {len(found.config)} times: give one file")
        path = found.config[0]
        actions = {a.dest: a for a in self._actions if a.option_strings and a.dest != "help"}
        actions.pop("config", None)
        tokens = []
        for key, value in self._read_config(path).items():
            tokens += self._config_tokens(path, key, value, actions, rules)
        given = self.explicit(rest)
        self.config_file = path
        self.from_config = {self._option_string_actions[t.split("=")[0]].dest for t in tokens}
        self.from_config -= given
        return tokens + rest

    def _read_config(self, path: str) -> dict:
        """The mapping in the YAML file `path` (yaml.safe_load: plain data, never objects)."""
        import yaml  # only a command given -c pays for it

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(2**20 + 1)
        except OSError as err:
            self.error(f"-c {path}: {err.strerror or err}; give a YAML file of flag values")
        except UnicodeDecodeError:
            self.error(f"-c {path}: not a text file; give a YAML file of flag values")
        if len(text) > 2**20:
            self.error(f"-c {path}: larger than 1 MB, not a config file")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            self.error(f"-c {path}: not valid YAML{where}: {problem}")
        if values is None:  # empty, or comments only
            return {}
        if not isinstance(values, dict):
            self.error(
                f"-c {path}: holds a {type(values).__name__}; give a mapping of flag names to "
                "values, one per line (batch_size: 64)"
            )
        return values

    def _config_tokens(
        self, path: str, key, value, actions: dict, rules: dict[str, tuple[str, Callable]]
    ) -> list[str]:
        """The command-line tokens that give `key` the `value` of the file `path`."""
        if key == "config":
            self.error(f"{path}: config: a config file cannot name another; merge them into one")
        action = actions.get(key) if isinstance(key, str) else None
        if action is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), list(actions), 3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            self.error(
                f"{path}: unknown key {key!r}{hint}; the keys are {self.prog}'s flags written "
                f"with underscores: {', '.join(sorted(actions))}"
            )
        if action.nargs == 0:  # --amp, --no-stn (store_true), --channels-last/--no-channels-last
            if value is None and action.default is None:
                return []
            if not isinstance(value, bool):
                self.error(f"{path}: {key}: {yaml_text(value)}: must be true or false")
            if isinstance(action, argparse.BooleanOptionalAction):
                return [action.option_strings[0 if value else 1]]
            return [action.option_strings[0]] if value == action.const else []
        items = value if isinstance(action, argparse._AppendAction) else [value]
        tokens = []
        for item in items if isinstance(items, list) else [items]:
            text = self._config_value(path, key, item, action, rules)
            if text is not None:  # `--flag=value`, one token: a value may start with "-"
                tokens.append(f"{action.option_strings[-1]}={text}")
        return tokens

    def _config_value(
        self, path: str, key: str, value, action: argparse.Action, rules: dict
    ) -> str | None:
        """`value` as the command line would give it, checked as the command line's would be;
        None for a null where the flag's default is None (nothing to give)."""
        if value is None and action.default is None:
            return None
        if action.choices is not None:
            accepted = "one of " + ", ".join(map(str, action.choices))
        else:
            accepted = {int: "a whole number", float: "a number"}.get(action.type, "text")
        if key in rules:
            accepted += f" ({rules[key][0]})"
        bad = f"{path}: {key}: {yaml_text(value)}: must be {accepted}"
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            # YAML reads yes, no, on, off and dates as other types: text must be quoted then
            quote = action.type is None and not isinstance(value, (list, dict))
            self.error(bad + (" (put text in quotes: YAML reads yes, no, on, off and dates as "
                              "other types)" if quote else ""))  # fmt: skip
        text = str(value)
        try:
            converted = action.type(text) if callable(action.type) else text
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            self.error(bad)
        if action.choices is not None and converted not in action.choices:
            self.error(bad)
        if key in rules:
            finite = not isinstance(converted, float) or math.isfinite(converted)
            if not finite or not rules[key][1](converted):
                self.error(bad)
        return text


def yaml_text(value) -> str:
    """A value read from YAML as the file wrote it: null, true, 'two', 0.5."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


DEVICE_HELP = "cpu, cuda or cuda:N (default: a GPU if there is one; cuda:LOCAL_RANK under torchrun)"


def add_device_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device, parsed by `resolve_device` when the command runs (not at import: no CUDA call)."""
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def add_model_arguments(
    parser: argparse.ArgumentParser,
    sizes: Iterable[str],
    default_size: str | None = None,
    checkpoint_help: str | None = None,
) -> argparse._ArgumentGroup:
    """The model group: --model-size (one of `sizes`, models.SIZES) and --model, resolved by
    `ArgumentParser.model_name`; with `checkpoint_help`, also --checkpoint (required) and --weights
    for the commands that run a trained model. Returns the group for the command's own flags."""
    group = parser.add_argument_group("model")
    default = f"default: {default_size}" if default_size else "default: what the checkpoint says"
    group.add_argument(
        "--model-size",
        default=None,
        choices=list(sizes),
        help=f"EmoNeXt size, i.e. --model emonext_SIZE ({default})",
    )
    group.add_argument(
        "--model",
        default=None,
        help="any create_model name (emonext_tiny, convnext_base, resemotenet, timm:NAME, ...) "
        "instead of --model-size",
    )
    if checkpoint_help:
        group.add_argument("--checkpoint", required=True, help=checkpoint_help)
        group.add_argument(
            "--weights",
            default="auto",
            choices=["auto", "ema", "model"],
            help="which weights of the checkpoint: auto = the EMA weights where it has them "
            "(the official test protocol)",
        )
    return group


def add_allow_torchscript_argument(parser: argparse.ArgumentParser) -> None:
    """--allow-torchscript, for the commands that can run a TorchScript export as --checkpoint."""
    parser.add_argument(
        "--allow-torchscript",
        action="store_true",
        help="run a TorchScript --checkpoint: it is a program and runs its own code as it loads, "
        "so give it only for a file you trust (default: refused)",
    )


def run_command(prog: str, main: Callable, args) -> object:
    """main(args), its output free to go nowhere (`output_may_lose_its_reader`); a CLIError (a
    DeviceError among them), out of memory (`is_out_of_memory`), or a full disk or another failed
    write (`WRITE_ERRNOS`), ends the process with one line."""
    with output_may_lose_its_reader():  # the one-line errors too: stderr may be a pipe
        try:
            return main(args)
        except CLIError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_status) from None
        except (OSError, MemoryError, RuntimeError) as err:
            if is_out_of_memory(err):
                advice = "give a smaller --batch-size (or a smaller input)"
                print(f"{prog}: error: {out_of_memory_message(err)}; {advice}", file=sys.stderr)
                raise SystemExit(1) from None
            if not isinstance(err, OSError) or err.errno not in WRITE_ERRNOS:
                raise
            print(f"{prog}: error: {write_failure(err)}", file=sys.stderr)
            raise SystemExit(1) from None


# A write to stdout or stderr whose reader is gone: a closed pipe (`train.py | head -1`: EPIPE,
# BrokenPipeError) or a hung-up terminal (EIO).
READER_GONE_ERRNOS = {errno.EPIPE, errno.EIO}


class ReaderMayGo:
    """A standard stream (stdout, stderr) whose reader may go away. On the first write that finds
    it gone, the stream's file descriptor is pointed at /dev/null (the dup2 that Python's
    documentation on SIGPIPE advises), so this and every later write, Python's own flush at exit
    included, is dropped and the work goes on: a closed pipe must not end a training run."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as err:
            self._reader_gone(err)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as err:
            self._reader_gone(err)

    def _reader_gone(self, err: OSError) -> None:
        if err.errno not in READER_GONE_ERRNOS:
            raise err
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())
        finally:
            os.close(devnull)
        try:
            self.stream.flush()  # what is still buffered goes to /dev/null
        except OSError:
            pass

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


@contextmanager
def output_may_lose_its_reader() -> Iterator[None]:
    """sys.stdout and sys.stderr as `ReaderMayGo` streams inside the `with`; flushed through them
    and put back on every way out."""
    saved = sys.stdout, sys.stderr
    streams = [s if s is None or isinstance(s, ReaderMayGo) else ReaderMayGo(s) for s in saved]
    sys.stdout, sys.stderr = streams  # (None under pythonw)
    try:
        yield
    finally:
        for stream in streams:
            if stream is not None:
                stream.flush()
        sys.stdout, sys.stderr = saved


def is_terminal() -> bool:
    """Whether a person watches the output: stdout and stderr are both terminals. Progress bars
    only then (tqdm's `disable=None` asks the same of its own stream); in a log file their
    carriage returns pile up."""
    return all(getattr(s, "isatty", lambda: False)() for s in (sys.stdout, sys.stderr))


def is_out_of_memory(err: BaseException) -> bool:
    """Out of memory: Python's MemoryError, torch.cuda.OutOfMemoryError (CUDA, and other
    accelerators), or the RuntimeError of torch's CPU allocator."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def out_of_memory_message(err: BaseException) -> str:
    """Out of memory where, and how much more was asked where torch says, in a few words."""
    text = str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        where, asked = "the GPU", re.search(r"Tried to allocate ([\d.]+ \w+)", text)
        size = asked.group(1) if asked else None
    else:  # torch's CPU allocator says "... you tried to allocate N bytes"
        where, asked = "the CPU (host memory)", re.search(r"allocate (\d+) bytes", text)
        size = f"{int(asked.group(1)) / 2**30:.2f} GiB" if asked else None
    return f"out of memory on {where}" + (f", asking for {size} more" if size else "")


# --------------------------------------------------------------------------- devices


def resolve_device(name: str | None = None, local_rank: int | None = None) -> torch.device:
    """The torch.device for `--device NAME`: None (a GPU if there is one), cpu, cuda or cuda:N.

    CUDA devices always come back with an index (torch.cuda.set_device rejects a bare "cuda"):
    cuda:LOCAL_RANK under torchrun, else cuda:0. An explicit cuda:N under a multi-process
    torchrun would put every rank on one GPU, so it is refused there.
    """
    text = "auto" if name is None else str(name).strip().lower()
    if text in ("auto", ""):
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise DeviceError(f"--device {name!r}: expected cpu, cuda or cuda:N (N a GPU index)")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"--device {name}: no CUDA GPU is visible to PyTorch {torch.__version__} on this "
            "machine; use --device cpu (or install a CUDA build of torch)"
        )
    count = torch.cuda.device_count()
    if match.group(1) is not None:
        index = int(match.group(1))
        if local_rank is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise DeviceError(
                f"--device {name}: under torchrun each process uses cuda:LOCAL_RANK; "
                "pass --device cuda (or leave it out)"
            )
    else:
        index = local_rank or 0
    if index >= count:
        raise DeviceError(
            f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            + ("" if match.group(1) is not None else f" (LOCAL_RANK {index})")
        )
    return torch.device("cuda", index)


def setup_distributed(
    device_name: str | None, timeout_s: float | None = None
) -> tuple[int, int, torch.device]:
    """Rank, world size and device, from torchrun's environment (one process when absent).

    Each process uses cuda:LOCAL_RANK on a GPU machine (`resolve_device`); a --device the
    machine cannot honour raises DeviceError before any process group is made. `timeout_s`: how
    long a collective waits for a process that does not answer (None: torch.distributed's own).
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ:  # started by torchrun: DDP, even for one process
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return rank, world_size, device


@contextmanager
def process_group_destroyed_on_exit() -> Iterator[None]:
    """torch.distributed's process group (if any) is destroyed on every way out."""
    try:
        yield
    finally:
        if is_distributed():
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


# gloo's errors when another process of the run is gone (killed: its sockets closed; stopped or
# cut off: --dist-timeout passed). They come as plain RuntimeErrors; NCCL's as DistError.
PEER_LOST_MESSAGES = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Connection refused",
    "Broken pipe",
    "Timed out waiting",
    "Socket Timeout",
)


def lost_peer(err: BaseException) -> str | None:
    """When `err` is a collective that failed because another process of the run stopped or
    cannot be reached: the backend's reason, one line (gloo's source file and advice left out).
    Otherwise None."""
    if not is_distributed() or not isinstance(err, RuntimeError):
        return None
    text = str(err).strip()
    if not isinstance(err, dist.DistError) and not any(m in text for m in PEER_LOST_MESSAGES):
        return None
    line = text.splitlines()[0] if text else type(err).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # "[.../gloo/transport/tcp/pair.cc:561] "
    return line.split(". ")[0].rstrip(".")


def all_gather(value) -> list:
    """`value` of every rank, in rank order (a one-element list outside torch.distributed)."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast(value):
    """Rank 0's `value` on every rank (`value` itself outside torch.distributed)."""
    return all_gather(value)[0]


def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm statistics drift apart under DDP)."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src)


def peak_memory_gb(device: torch.device) -> float | None:
    """The most GPU memory this process has held on `device` (GiB), None off CUDA. The device is
    named: under torchrun each rank reads its own GPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


# --------------------------------------------------------------------------- seeds and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Python's, NumPy's, torch's and this process's GPU's generators, as plain tensors and lists
    (a checkpoint loads with weights_only=True)."""
    state = {
        "python": list(random.getstate()[1]),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":  # this process's GPU only: under DDP each rank saves its own
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate((3, tuple(state["python"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if device.type == "cuda" and isinstance(cuda_state, torch.Tensor):
        torch.cuda.set_rng_state(cuda_state, device)


# --------------------------------------------------------------------------- fault points

_FAULT_COUNTS: Counter = Counter()


def fault_point(name: str) -> None:
    """A named point where the fault-injection tests stop the process (docs/RELIABILITY.md).

    EMONEXT_FAULT="NAME:N:SIGNAL" (e.g. "step:10:SIGKILL") sends SIGNAL to this process the N-th
    time it reaches NAME, so that a test kills it at an exact point instead of after a guessed
    delay; "NAME:N:SIGNAL@RANK" only in the process of that RANK (torchrun's), and several
    faults are separated by commas. Unset, this is one dictionary look-up.
    """
    specs = os.environ.get("EMONEXT_FAULT")
    if not specs:
        return
    counted = False
    for spec in specs.split(","):
        spec, _, rank = spec.partition("@")
        point, count, sig = spec.rsplit(":", 2)
        if point != name or (rank and rank != os.environ.get("RANK", "0")):
            continue
        if not counted:  # each time NAME is reached counts once, whatever the faults there
            _FAULT_COUNTS[name] += 1
            counted = True
        if _FAULT_COUNTS[name] == int(count):
            os.kill(os.getpid(), getattr(signal, sig))


def reset_fault_points() -> None:
    """Count from zero again (each run of train.main in one process counts its own points)."""
    _FAULT_COUNTS.clear()


# --------------------------------------------------------------------------- interrupts


class Interrupted:
    """SIGTERM / Ctrl-C (or the `signals` given) while training: the loop finishes its step and
    stops (truthy once a signal came); a second one stops at once. Once `exit_message` is set
    (training is over), a signal exits at once with that message.

    A context manager: the handlers are installed on entry and the previous ones restored on
    every way out, so an in-process caller (a test, a notebook) gets its own Ctrl-C back.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.signum = 0
        self.exit_message: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> Interrupted:
        self.previous = {sig: signal.signal(sig, self.handle) for sig in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """The handlers from before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def handle(self, signum, frame):
        if self.exit_message is not None:
            self.restore()
            if self.exit_message:
                print(self.exit_message)
            raise SystemExit(128 + signum)
        if self.signum:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return bool(self.signum)


class StopVote:
    """The signals of `interrupted` (each process gets its own, e.g. SLURM's on each node, seconds
    apart) as one decision that every rank takes after the same step: a rank that stopped alone
    would leave the others waiting in the next collective (gloo: "Connection closed by peer").

    `after_step` starts an all_reduce (MAX) of this rank's signal number without waiting for it
    and returns the one started a step earlier: every rank stops one step after the first signal,
    and the host never waits for the step it has just queued (on a GPU, only for the one before).
    `now` agrees at once (a blocking all_reduce: at an epoch's end). Once agreed, `signum` is the
    signal on every rank (the highest number if several came). One process: the signal itself.
    """

    def __init__(self, interrupted: Interrupted, device: torch.device | str):
        self.interrupted, self.device = interrupted, torch.device(device)
        self.signum = 0
        self._pending = None  # (work, flag on the host or the device, CUDA event or None)

    def after_step(self) -> bool:
        if not is_distributed():
            self.signum = self.interrupted.signum
            return bool(self.signum)
        if self._read():
            return True
        self._pending = self._start()
        return False

    def _start(self) -> tuple:
        """This rank's signal, reduced (MAX) without waiting: (work, flag, CUDA event or None).
        On a GPU the host must not wait for the step just queued: NCCL's `wait` makes the
        stream (not the host) wait for the reduction, the copy to the host (pinned memory, as
        a non-blocking copy to the CPU allocates it) queues behind it, and the event marks its
        end; `_read` waits for that event, a step later."""
        flag = torch.full((1,), self.interrupted.signum, device=self.device, dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        if self.device.type != "cuda":
            return work, flag, None
        work.wait()
        host = flag.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return work, host, event

    def now(self) -> bool:
        if not is_distributed():
            return self.after_step()
        self._read()  # the vote still under way, whatever it says: this one includes it
        flag = torch.full((1,), self.interrupted.signum, device=self.device, dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return bool(self.signum)

    def settle(self) -> None:
        """Wait for the vote under way (the loop ended by itself: it is not needed)."""
        self._read()

    def _read(self) -> bool:
        if self._pending is None:
            return False
        work, flag, event = self._pending
        self._pending = None
        if event is None:
            work.wait()
        else:
            event.synchronize()
        self.signum = int(flag.item())
        return bool(self.signum)


# --------------------------------------------------------------------------- files


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in chunks (large files never held whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_output_dir(folder: str | os.PathLike, flag: str, room: int = 0) -> None:
    """Before any work: `folder` exists or can be made, is a folder, can be written to, and has
    `room` bytes free (e.g. one checkpoint); else a CLIError naming the flag, the path and what to
    do. Nothing is created: the first existing folder on the way up is what is checked."""
    existing = existing_part(folder)
    if not existing.is_dir():
        raise CLIError(f"{flag} {folder}: {existing} is a file, not a folder; give a folder path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(
            f"{flag} {folder}: {existing} is not writable by this user (or is on a read-only "
            f"file system); give a folder you can write to"
        )
    free = shutil.disk_usage(existing).free
    if free < room:
        raise CLIError(
            f"{flag} {folder}: {free / 2**20:.0f} MB free on its disk, {room / 2**20:.0f} MB "
            "needed for one checkpoint; free some space or give a folder on another disk"
        )


def existing_part(path: str | os.PathLike) -> Path:
    """The longest leading part of `path` that exists (what a write there would meet first)."""
    existing = Path(path).absolute()
    while existing != existing.parent:
        with suppress(OSError):  # a path too long to look at (ENAMETOOLONG) does not exist
            if existing.exists():
                break
        existing = existing.parent
    return existing


def check_path_fits(path: str | os.PathLike, flag: str, what: str) -> None:
    """`path` (a file a command will write; absolute, as it will be opened) within the file
    system's limits: each name at most NAME_MAX bytes (255 on most), the whole at most PATH_MAX - 1
    (4095 on Linux); else a CLIError naming `flag` and `what` the file is, before any work."""
    path = os.path.abspath(path)
    existing = existing_part(path)
    name_max = path_max = None
    with suppress(OSError, ValueError):  # pathconf is POSIX; its names may be absent
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    name_max, path_max = name_max or 255, path_max or 4096
    for name in Path(path).parts[1:]:
        if len(name.encode()) > name_max:
            raise CLIError(
                f"{flag}: {what} would be named {name[:24]}... ({len(name.encode())} bytes); file "
                f"names have at most {name_max} bytes here; give a shorter {flag}"
            )
    if len(path.encode()) >= path_max:
        raise CLIError(
            f"{flag}: {what} would be {path[:24]}... ({len(path.encode())} bytes); paths have at "
            f"most {path_max - 1} bytes here; give a shorter {flag}"
        )


@contextmanager
def made_folders_removed_if_empty(folder: str | os.PathLike) -> Iterator[None]:
    """`folder` and those above it that do not exist yet are made by the command, maybe: on every
    way out of the `with`, those of them still empty are removed (a failed start leaves no empty
    folder behind). A folder that existed before is never touched."""
    missing, path = [], Path(folder).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)  # deepest first
        path = path.parent
    try:
        yield
    finally:
        for path in missing:
            try:
                path.rmdir()
            except FileNotFoundError:  # never made
                continue
            except OSError:  # not empty: the command's files, or another's
                break


def check_file_name(name: str, flag: str) -> None:
    """A name that is one file or folder name: no separator, not . or .., not too long for the
    file system (255 bytes on most)."""
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\x00" in name:
        raise CLIError(f"{flag} {name!r}: must be a single folder name (no '/', not '.' or '..')")
    if len(name.encode()) > 255:
        raise CLIError(f"{flag}: {len(name.encode())} bytes long; file names have at most 255")


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EFBIG}


def write_failure(err: OSError) -> str:
    """What a failed write says: the file, the reason, the room left on its disk."""
    where = err.filename or ""
    room = ""
    if where:
        room = f", {shutil.disk_usage(existing_part(where)).free / 2**20:.0f} MB free on its disk"
    return f"writing {where or 'a file'} failed: {err.strerror or err}{room}"


class RunLock:
    """One process writes a run folder: `lock_path` created exclusively by `acquire`, holding this
    process's host and pid, removed by `release`. A lock of a process that is gone (same host, no
    such pid) is taken over; `holder` names a live one."""

    def __init__(self, lock_path: Path, folder: Path):
        self.path, self.folder, self.held = Path(lock_path), folder, False

    def holder(self) -> str | None:
        """The live process holding the lock, as "host:pid"; None when it is free or stale."""
        try:
            host, pid = self.path.read_text().strip().rsplit(":", 1)
        except (OSError, ValueError):
            return None  # gone, or a half-written lock of a process killed while writing it
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return None
            except (PermissionError, ValueError):
                pass  # another user's live process
        return f"{host}:{pid}"

    def acquire(self) -> bool:
        """Take the lock; False when a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a stale lock is removed once, then created anew
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self.holder() is not None:
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()}:{os.getpid()}\n")
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file, then rename: readers never see half a file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", newline="") as f:  # newline="": CSV text keeps its own line ends
            f.write(text)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: an interrupted save never leaves a broken
    file (and a failed one, e.g. a full disk, removes its temporary file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, RuntimeError):  # torch's writer reports a failed write (a full disk)
            free = shutil.disk_usage(path.parent).free  # as "[enforce fail at ...] unexpected pos"
            code = errno.ENOSPC if free < 2**20 * 64 else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from err
        raise
    fault_point(f"save:{path.name}")
    os.replace(tmp, path)


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes a copy of src: a hard link where the file system allows (no second write of
    hundreds of MB; replacing src later leaves dst as it is), else a copy; atomic either way."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    fault_point(f"save:{dst.name}")
    os.replace(tmp, dst)


def host_copy(t: torch.Tensor) -> tuple[torch.Tensor, torch.device | None]:
    """A copy of `t` in host memory, in its layout, and the CUDA device on whose current stream
    the copy is still running (None: the copy is done). A CUDA tensor is copied asynchronously
    into pinned memory (PyTorch's caching host allocator reuses those blocks epoch after epoch)."""
    if t.is_cuda:
        pinned = torch.empty_like(t, device="cpu", pin_memory=True)
        return pinned.copy_(t, non_blocking=True), t.device
    return t.detach().clone(), None


def snapshot(obj, copies_on: set):
    """`obj` with every tensor in its dicts, lists and tuples copied by host_copy (dicts keep
    their class and attributes, e.g. a state dict's _metadata); other values are kept as they
    are. Adds to `copies_on` the CUDA devices whose copies are still running."""
    if isinstance(obj, torch.Tensor):
        out, device = host_copy(obj)
        if device is not None:
            copies_on.add(device)
        return out
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = snapshot(v, copies_on)
        return out
    if isinstance(obj, (list, tuple)):
        items = [snapshot(v, copies_on) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread while training goes on.

    Written in the training loop, a Tiny checkpoint (484.6 MB: weights, EMA weights, AdamW's
    state) kept an H200 idle for 0.46 s every epoch; torch.save releases the GIL while it writes,
    so the loop runs on meanwhile. The next step updates weights and optimiser state in place,
    so `save` writes a copy (snapshot): CUDA tensors are copied into pinned host memory on their
    stream, asynchronously, and the writer waits for an event recorded after the copies before
    it serialises (later in-place updates on that stream run after the copies). The copy costs
    one checkpoint's size of host memory (pinned on CUDA) while it is written. One write at a
    time: `save` waits for the previous one first. The thread is not a daemon, so a run that
    fails meanwhile still finishes its file (written to .tmp, then renamed: a kill never leaves
    a broken one). The writer's error is raised in the main thread by the next `save` or `wait`.
    A context manager: every way out of the `with` waits for the last file.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: dict, path: Path, link: Path | list[Path] | None = None) -> None:
        """Write `state` as it is now to `path`, then make `link` (a path or several) the same
        file (link_or_copy)."""
        self.wait()
        copies_on = set()
        state = snapshot(state, copies_on)
        events = []
        for device in copies_on:
            events.append(torch.cuda.Event())
            events[-1].record(torch.cuda.current_stream(device))
        self._thread = threading.Thread(
            target=self._write, args=(state, events, path, link), name=f"write {path.name}"
        )
        self._thread.start()

    def _write(self, state: dict, events: list, path: Path, link: Path | None) -> None:
        try:
            for event in events:
                event.synchronize()  # the copies to host memory are complete
            atomic_save(state, path)
            for other in [link] if isinstance(link, Path) else link or []:
                link_or_copy(path, other)
        except BaseException as err:
            self._error = err

    def wait(self) -> None:
        """Until the file being written is written; raises the writer's error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Every way out waits; the writer's error does not hide one already on its way."""
        try:
            self.wait()
        except BaseException as err:
            if exc is None:
                raise
            print(f"writing the checkpoint failed as well: {err!r}", file=sys.stderr)


def git_commit() -> str:
    """The short commit of the code that runs ("unknown" outside a git clone)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --------------------------------------------------------------------------- wandb


def init_wandb(mode: str, run_dir: Path, run_id: str | None, config: dict):
    """A wandb run logging into `run_dir` (None for mode "disabled" or without wandb); `run_id`
    continues a resumed run's own wandb run. auto: online when logged in, offline otherwise."""
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: not logging to it")
        return None
    chosen = mode
    if mode == "auto":  # verify=False: no network needed to know whether a key is stored
        chosen = "online" if wandb.login(prompt=False, verify=False) else "offline"
    not_logged_in = mode == "auto" and chosen == "offline"
    print(f"wandb: logging {chosen}" + (" (not logged in)" if not_logged_in else ""))
    run_dir.mkdir(parents=True, exist_ok=True)  # wandb writes into it from the start
    if not os.environ.get("HOME"):  # (a batch job's environment) wandb-core would print ~18
        for name in ("XDG_CACHE_HOME", "XDG_STATE_HOME", "XDG_CONFIG_HOME"):  # log lines
            os.environ.setdefault(name, str((run_dir / "wandb" / name.lower()).resolve()))
    return wandb.init(
        project="EmoNeXt",
        name=run_dir.name,
        id=run_id,
        dir=str(run_dir.resolve()),
        mode=chosen,
        config=config,
        resume="allow",
        # Quiet: its banners and end-of-run summary are ~40 lines; ours is one.
        settings=wandb.Settings(silent=True),
    )


# --------------------------------------------------------------------------- figures


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """A matplotlib Figure as a PNG, written under a temporary name and renamed (a full disk
    leaves neither half a PNG nor the temporary file)."""
    tmp = f"{path}.tmp.png"  # matplotlib picks the format by the extension
    try:
        fig.savefig(tmp, dpi=100, **savefig_kwargs)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def confusion_matrix_figure(metrics: dict, title: str = ""):
    """Row-normalised colours, counts written in the cells."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    classes = metrics["classes"]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(1.1 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    ax = fig.add_subplot()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.2f} %")
    fig.tight_layout()
    return fig


def save_confusion_matrix(metrics: dict, path: str | os.PathLike, title: str = "") -> None:
    """`confusion_matrix_figure` of `metrics` (compute_metrics') as a PNG."""
    save_figure(confusion_matrix_figure(metrics, title), path)


def stn_figure(model: nn.Module, images: torch.Tensor, labels: list[str], title: str = ""):
    """One column per face, labelled with its class; the top row is the face given to the model
    ("input"), the bottom row what its Spatial Transformer (`model.stn`) makes of it. Each face is
    stretched to its own range, as torchvision's save_image(scale_each=True)."""
    from matplotlib.figure import Figure

    was_training = model.training
    model.eval()  # in train mode the STN's BatchNorm would learn from these images
    with torch.no_grad():
        warped = model.stn(images)
    model.train(was_training)
    rows = []
    for batch in (images, warped):
        faces = batch[:, 0].float().cpu()  # every channel holds the same grayscale face
        low = faces.amin((1, 2), keepdim=True)
        faces = (faces - low) / (faces.amax((1, 2), keepdim=True) - low).clamp_min(1e-8)
        rows.append(torch.cat(list(faces), dim=1))
    size, n = images.shape[-1], len(labels)
    # One image with tick labels, not 2 x n axes: a quarter of the drawing time.
    fig = Figure(figsize=(1.2 + 1.1 * n, 2.8))
    ax = fig.add_subplot()
    ax.imshow(torch.cat(rows).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([(i + 0.5) * size - 0.5 for i in range(n)], labels)
    ax.set_yticks([0.5 * size - 0.5, 1.5 * size - 0.5], ["input", "STN output"])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if title:
        ax.set_xlabel(title)
    return fig


def save_stn_grid(
    model: nn.Module, images: torch.Tensor, labels: list[str], path: Path, title: str = ""
) -> None:
    """`stn_figure` as a PNG, written atomically."""
    save_figure(stn_figure(model, images, labels, title), path, bbox_inches="tight")
