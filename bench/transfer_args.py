"""The transfer benches' shared arguments (bench/transfer.py, bench/control_path.py): where
the ranks run, which data path, how large a message."""

from __future__ import annotations

import argparse


def add_layout_argument(parser: argparse.ArgumentParser) -> None:
    """`--layout`: which processes `Role` puts the ranks in."""
    parser.add_argument(
        "--layout",
        choices=("rank", "role", "one"),
        default="rank",
        help="rank: a process per rank, as the daemons run them; role: every rank of a role in "
        "one process; one: every rank in this process",
    )


def add_data_path_argument(parser: argparse.ArgumentParser) -> None:
    """`--data-path`: how the ranks send and receive data messages (`data_paths` lists the
    runs)."""
    parser.add_argument(
        "--data-path",
        choices=("native", "ucxx", "both"),
        default="both",
        help="native: transport/native.py, each scatter launched by its receive's completion "
        "(a daemon's default); ucxx: ucxx's Python API, the scatter launched by the receive "
        "pipeline; both: one run each, side by side",
    )


def add_message_size_argument(parser: argparse.ArgumentParser) -> None:
    """`--max-message-mib`: the decode ranks' transfer.max_message_bytes (`max_message_bytes`
    turns it into bytes)."""
    parser.add_argument(
        "--max-message-mib",
        type=int,
        default=0,
        help="the decode ranks' largest message (transfer.max_message_bytes; default 0: a "
        "message per chunk): chunks ready together travel as one message up to this",
    )


def max_message_bytes(args: argparse.Namespace) -> None:
    """Set args.max_message_bytes from --max-message-mib."""
    args.max_message_bytes = (args.max_message_mib or 0) << 20


def data_paths(args: argparse.Namespace) -> list[bool]:
    """The runs `--data-path` asks for, as TransferConfig.native_ucx values, native first."""
    return {"native": [True], "ucxx": [False], "both": [True, False]}[args.data_path]
