#!/usr/bin/env python3
"""Helpers of guest/build-image.sh that need more than shell: kernel module
closure and a newc cpio writer. Standard library only.

  image-tool.py modules --moddir DIR --dest ROOT [--list NAME] [--have FILE]
                       [--compressed] NAME...
      Resolves NAME... and their dependencies (read from each module's
      .modinfo "depends=" field: Debian's kernel package ships no
      modules.dep, depmod runs at install time), skips built-in ones
      (modules.builtin) and those listed in FILE (another list, loaded
      before this one), installs the rest under ROOT/lib/modules/RELEASE/
      (decompressed, or as shipped with --compressed: the agent then lets
      the kernel decompress them) and writes ROOT/etc/kiln/NAME (default
      "modules") in load order. Prints the module names, in order.

  image-tool.py check-static FILE
      Fails unless FILE is an x86-64 ELF executable without a program
      interpreter (statically linked, static-pie included).

  image-tool.py cpio --root ROOT --out FILE [--gzip]
      Writes ROOT as a newc cpio archive (owner 0:0, mtime 0, sorted, so
      the output is reproducible), plus /dev/console.
"""

import argparse
import gzip
import lzma
import os
import stat
import struct
import subprocess
import sys

KO_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def module_name(filename):
    for suffix in KO_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    return None


def read_module(path):
    """The plain ELF bytes of a (possibly compressed) module."""
    if path.endswith(".xz"):
        with lzma.open(path) as f:
            return f.read()
    if path.endswith(".gz"):
        with gzip.open(path) as f:
            return f.read()
    if path.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq", path], check=True, stdout=subprocess.PIPE).stdout
    with open(path, "rb") as f:
        return f.read()


def modinfo(elf):
    """key -> [values] of the .modinfo section of a 64-bit little-endian ELF."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i):
        base = shoff + i * shentsize
        name, _type = struct.unpack_from("<II", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 24)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = elf.index(b"\0", str_off + name_off)
        if elf[str_off + name_off : end] != b".modinfo":
            continue
        for entry in elf[offset : offset + size].split(b"\0"):
            if b"=" in entry:
                key, value = entry.decode("utf-8", "replace").split("=", 1)
                info.setdefault(key, []).append(value)
    return info


def cmd_check_static(args):
    with open(args.file, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or struct.unpack_from("<H", elf, 0x12)[0] != 62:
        raise SystemExit(f"image-tool: {args.file} is not an x86-64 ELF file")
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    PT_INTERP = 3
    for i in range(phnum):
        if struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == PT_INTERP:
            raise SystemExit(f"image-tool: {args.file} is dynamically linked (has PT_INTERP)")


def cmd_modules(args):
    moddir = args.moddir.rstrip("/")
    release = os.path.basename(moddir)
    index = {}
    for dirpath, _dirs, files in os.walk(os.path.join(moddir, "kernel")):
        for filename in files:
            name = module_name(filename)
            if name:
                index[name] = os.path.relpath(os.path.join(dirpath, filename), moddir)
    builtin = set()
    builtin_path = os.path.join(moddir, "modules.builtin")
    if os.path.exists(builtin_path):
        with open(builtin_path) as f:
            for line in f:
                name = module_name(os.path.basename(line.strip()))
                if name:
                    builtin.add(name)

    have = set()
    if args.have:
        with open(args.have) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    have.add(module_name(os.path.basename(line)))

    order, seen, infos = [], set(), {}

    def visit(name, chain):
        name = name.replace("-", "_")
        if name in seen or name in builtin or name in have:
            return
        if name in chain:
            raise SystemExit(f"image-tool: module dependency cycle: {' -> '.join(chain + [name])}")
        if name not in index:
            raise SystemExit(f"image-tool: module {name} (needed by {chain or 'request'}) not found")
        elf = read_module(os.path.join(moddir, index[name]))
        info = modinfo(elf)
        infos[name] = elf
        for dep_list in info.get("depends", []):
            for dep in filter(None, dep_list.split(",")):
                visit(dep, chain + [name])
        seen.add(name)
        order.append(name)

    for name in args.names:
        norm = name.replace("-", "_")
        if norm in builtin:
            print(f"image-tool: {norm} is built into the kernel", file=sys.stderr)
            continue
        if norm not in index:
            print(f"image-tool: warning: module {norm} not shipped, skipped", file=sys.stderr)
            continue
        visit(norm, [])

    lines = []
    for name in order:
        rel = index[name]
        if args.compressed:
            with open(os.path.join(moddir, rel), "rb") as f:
                data = f.read()
        else:
            data = infos[name]
            for suffix in (".xz", ".zst", ".gz"):
                if rel.endswith(suffix):
                    rel = rel[: -len(suffix)]
        target = os.path.join("lib", "modules", release, rel)
        dest = os.path.join(args.dest, target)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(data)
        os.chmod(dest, 0o644)
        lines.append(target)
    kiln_etc = os.path.join(args.dest, "etc", "kiln")
    os.makedirs(kiln_etc, exist_ok=True)
    with open(os.path.join(kiln_etc, args.list), "w") as f:
        f.write("# Loaded in this order by kiln-agent (finit_module); generated by build-image.sh\n")
        f.write("".join(line + "\n" for line in lines))
    print(" ".join(order))


class NewcWriter:
    """Minimal SVR4 "newc" cpio writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self, out):
        self.out = out
        self.ino = 1
        self.written = 0

    def _write(self, data):
        self.out.write(data)
        self.written += len(data)

    def _pad(self):
        if self.written % 4:
            self._write(b"\0" * (4 - self.written % 4))

    def entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        name_bytes = name.encode() + b"\0"
        fields = [
            self.ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev[0], rdev[1], len(name_bytes), 0,
        ]
        self.ino += 1
        self._write(b"070701" + b"".join(b"%08X" % v for v in fields))
        self._write(name_bytes)
        self._pad()
        self._write(data)
        self._pad()

    def trailer(self):
        self.ino = 0
        self.entry("TRAILER!!!", 0, nlink=1)
        # Pad to a 512-byte block like GNU cpio does.
        if self.written % 512:
            self._write(b"\0" * (512 - self.written % 512))


PAGE_SIZE = 4096


def cmd_cpio(args):
    root = args.root.rstrip("/")
    tmp = args.out + ".tmp"
    raw = open(tmp, "wb")
    out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) if args.gzip else raw
    writer = NewcWriter(out)
    seen = set()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in [None] + sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(dirpath, d))):
            path = dirpath if name is None else os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel == ".":
                continue
            st = os.lstat(path)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                writer.entry(rel, stat.S_IFDIR | perm, nlink=2)
            elif stat.S_ISLNK(st.st_mode):
                writer.entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    writer.entry(rel, stat.S_IFREG | perm, f.read())
            else:
                raise SystemExit(f"image-tool: unsupported file type: {path}")
            seen.add(rel)
    if "dev" not in seen:
        writer.entry("dev", stat.S_IFDIR | 0o755, nlink=2)
    writer.entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    writer.trailer()
    if args.gzip:
        out.close()
    # A whole number of pages, zero-filled (the kernel skips zeros after an
    # archive): QEMU puts a direct-boot (PVH) kernel's initrd at the top of
    # low RAM with its start page-aligned, so a partial last page would
    # overlap the ACPI tables the firmware keeps in the top KiB
    # (docs/benchmarks.md "Direct (PVH) boot").
    raw.write(b"\0" * (-raw.tell() % PAGE_SIZE))
    raw.close()
    os.replace(tmp, args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("modules")
    p.add_argument("--moddir", required=True, help="…/lib/modules/RELEASE of the unpacked kernel package")
    p.add_argument("--dest", required=True, help="initramfs staging root")
    p.add_argument("--list", default="modules", help="list file written to ROOT/etc/kiln/")
    p.add_argument("--have", help="a list whose modules are loaded already")
    p.add_argument("--compressed", action="store_true", help="install modules as shipped")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=cmd_modules)
    p = sub.add_parser("check-static")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_static)
    p = sub.add_parser("cpio")
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gzip", action="store_true")
    p.set_defaults(func=cmd_cpio)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
