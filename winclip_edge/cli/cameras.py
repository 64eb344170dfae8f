"""``winclip-edge cameras``: the GenICam cameras this machine finds, one line each with the id ``genicam:ID`` takes
(docs/cameras.md); ``--features ID``: that camera's features, values and allowed ranges."""
from __future__ import annotations

import argparse


from .commands import Commands
from .common import EXIT_OK


def cmd_cameras(args: argparse.Namespace) -> int:
    from ..line.genicam import camera_features, list_cameras

    if args.features is not None:
        info, features = camera_features(args.features)
        print(info.line())
        for feature in features:
            print(f"  {feature.line()}")
        return EXIT_OK
    cameras = list_cameras()
    for camera in cameras:
        print(camera.line())
    if not cameras:
        print("no cameras found (GigE Vision: same subnet, UDP 3956 open; USB3 Vision: udev rules)")
    return EXIT_OK


def register(sub: Commands) -> None:
    p = sub.add_parser("cameras", help="list the GenICam cameras (GigE Vision, USB3 Vision) found, one line each with "
                                       "the id a genicam:ID source takes (Aravis; docs/cameras.md)")
    p.add_argument("--features", metavar="ID", nargs="?", const="",
                   help="list the features of camera ID (id, serial number or IP; alone: the first camera) with their "
                        "values and what they take")
    p.set_defaults(run=cmd_cameras)
