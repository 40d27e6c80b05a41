#!/usr/bin/env python3
"""Packs a root filesystem tar as a one-layer OCI image layout, written as a tar.

    pack-oci.py ROOTFS.tar REFERENCE OUT.tar

The layer is the rootfs tar, gzip-compressed; the config says linux/amd64, PATH, CMD bash,
and the layer's diff_id (the sha256 of the uncompressed tar); index.json names the image by
the org.opencontainers.image.ref.name annotation, which `msb load` uses as its reference.
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def main():
    rootfs, ref, out = sys.argv[1:4]
    work = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)))
    try:
        layer = os.path.join(work, "layer.tar.gz")
        with open(rootfs, "rb") as src, gzip.GzipFile(layer, "wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        diff_id, layer_digest = sha256_file(rootfs), sha256_file(layer)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
                "Cmd": ["/bin/bash"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
        config_bytes = json.dumps(config, sort_keys=True).encode()
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": len(config_bytes)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                        "size": os.path.getsize(layer)}],
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": manifest["mediaType"], "digest": manifest_digest,
                           "size": len(manifest_bytes), "platform": {"architecture": "amd64", "os": "linux"},
                           "annotations": {"org.opencontainers.image.ref.name": ref}}],
        }

        def add_bytes(t, name, data):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            t.addfile(info, io.BytesIO(data))

        with tarfile.open(out, "w") as t:
            add_bytes(t, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes(t, "index.json", json.dumps(index).encode())
            add_bytes(t, "blobs/sha256/" + config_digest[7:], config_bytes)
            add_bytes(t, "blobs/sha256/" + manifest_digest[7:], manifest_bytes)
            t.add(layer, "blobs/sha256/" + layer_digest[7:])
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
