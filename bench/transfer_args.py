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


# data path -> (TransferConfig.native_ucx, .post_receives_ahead)
PATHS = {
    "native": (True, None),
    "posted": (True, True),
    "probe": (True, False),
    "ucxx": (False, False),
}
# runs side by side: the first of each pair ÷ the second is what the benches print
PAIRS = {"both": ("native", "ucxx"), "ahead": ("posted", "probe")}


def add_data_path_argument(parser: argparse.ArgumentParser) -> None:
    """`--data-path`: how the ranks send and receive data messages (`data_paths` lists the
    runs)."""
    parser.add_argument(
        "--data-path",
        choices=(*PATHS, *PAIRS),
        default="both",
        help="native: transport/native.py, each scatter launched by its receive's completion "
        "(a daemon's default: a room's receives posted as it registers where the cache is on "
        "a GPU); posted: the same with the receives posted as the room registers whatever the "
        "cache; probe: the same with each receive posted once its message has come; ucxx: "
        "ucxx's Python API, the scatter launched by the receive pipeline; both: native and "
        "ucxx side by side; ahead: posted and probe side by side",
    )


def data_paths(args: argparse.Namespace) -> list[str]:
    """The runs `--data-path` asks for, by name (keys of PATHS), native first."""
    return list(PAIRS.get(args.data_path, (args.data_path,)))


def use_data_path(args: argparse.Namespace, path: str) -> None:
    """Set args.native and args.ahead (what `transfer_sides.Role` configures) for `path`."""
    args.native, args.ahead = PATHS[path]


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
