"""How the notebook kit runs a kernel: IPC sockets in a fresh folder, no widget round trip, environment set and
restored. Used by minialign.kit.repro (papermill) and minialign.kit.course (nbclient)."""
from __future__ import annotations

import os


def kernel_options(folder: str) -> dict:
    """nbclient options: IPC transport on POSIX, so the kernel has no unencrypted TCP port (and no warning), with
    its sockets in a fresh temporary folder: under the default name (kernel-ipc-N in the notebooks' folder) two
    runs at once can pick the same socket files and one of them waits forever. folder: where the sockets go."""
    if os.name != "posix":
        return {}
    from traitlets.config import Config

    ip = os.path.join(folder, "ipc")
    return {"config": Config({"KernelManager": {"transport": "ipc", "ip": ip}})}


class no_widget_sync:
    """nbclient's handler of ipywidgets' Output widget (`interact` uses one) off: its outputs land in the cell. On, it
    sends comm messages on the shell channel while the client awaits the cell's reply there; here that lost the
    reply three times (notebooks 02 and 04, cpu and smoke: kernel idle, client waiting forever)."""

    def __enter__(self):
        from nbclient.client import NotebookClient

        self.saved = NotebookClient.on_comm_open_jupyter_widget
        NotebookClient.on_comm_open_jupyter_widget = lambda client, msg: None
        return self

    def __exit__(self, *exc):
        __import__("nbclient.client", fromlist=["NotebookClient"]).NotebookClient.on_comm_open_jupyter_widget = self.saved


def set_env(values: dict) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
