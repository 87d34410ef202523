"""Storage paths: local directories or object-store URIs (s3://, gs://, file://) through pyarrow."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def absolute(uri: str) -> str:
    """Local paths become absolute (Ray jobs run in another cwd); URIs are kept."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def fs_path(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def for_users(uri: str) -> str:
    """How a location is shown and recorded: a plain path for local storage (what from_pretrained
    takes), the URI itself for object stores."""
    return local_path(uri) if is_local(uri) else uri


def exists(uri: str) -> bool:
    fs, path = fs_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str | None:
    fs, path = fs_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    fs, path = fs_path(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def upload_dir(local_dir: str, uri: str) -> None:
    fs, path = fs_path(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def copy_dir(src_uri: str, dst_uri: str) -> None:
    """Copy a directory between any two locations (streamed, nothing staged on the local disk)."""
    src_fs, src = fs_path(src_uri)
    dst_fs, dst = fs_path(dst_uri)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def download_dir(uri: str, local_dir: str) -> str:
    """A local directory holding `uri` (the path itself when it is local)."""
    if is_local(uri):
        return local_path(uri)
    fs, path = fs_path(uri)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir
