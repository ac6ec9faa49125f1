"""The mount: POSIX filesystem semantics on top of the index and the file-data layer.

This module maps pyfuse3 requests to index changes (names, attributes, links, xattrs)
and to `FileData` calls (contents). It knows nothing of packs, crypto or peers; it tells
`lanes.Lanes` about names (lookups, creations, links, renames, removals, `.backupignore`
writes) and truncations (`max_file_size`), which decides per inode whether its data stays local, replicates, or goes first. Every
handler runs through `_boundary`, which turns any failure into a FUSEError: an exception
escaping a handler would end pyfuse3's main loop and kill the mount.

Every file shows a read-only extended attribute `user.bpfs.copies` ("2/2"): how many partners in
good standing hold every chunk of it and a snapshot made after its last change, over the replica
target. The count comes from the `copies` callable the daemon passes in (the partner service);
this module only finds the packs a file's chunks live in. It is not listed by listxattr, so
`cp -a` and `rsync -X` do not copy it.

Listings start with `.` and `..` (the root folder's `..` is itself) at readdir offsets 1 and 2; every
other entry's offset is its `Index.list_entries` id plus 2, so offsets never collide and stay valid
while entries come and go. rename() takes RENAME_NOREPLACE and RENAME_EXCHANGE; RENAME_WHITEOUT
(overlayfs) and anything else is refused with EINVAL, never done as a plain rename. Every setattr
updates ctime, chown(f, -1, -1) included. Times are stored in full (64-bit seconds, nanoseconds,
before 1970 too: see `index.Attr`).

POSIX ACLs: the mount asks for FUSE_POSIX_ACL, so the kernel enforces ACLs (with
default_permissions) and sends them here as the xattrs `system.posix_acl_access` and
`system.posix_acl_default`, which are stored like other xattrs (so snapshots, `cp -a` and
`rsync -A` keep them); every other `system.` name is refused (EOPNOTSUPP). The rest is this
module's, as a local filesystem does it: an access ACL sets the mode's permission bits (the group
bits are its mask) and is dropped when the mode says as much; chmod rewrites the ACL's owner, mask
(else group) and other entries; a new inode (not a symlink) in a folder with a default ACL gets an
access ACL from it, its mode restricted to match, and a new folder the default ACL too. One
difference: the kernel has already applied the umask to a new inode's mode, where a local
filesystem ignores the umask under a default ACL (pyfuse3 cannot ask for FUSE_CAP_DONT_MASK).
fallocate() is not offered: pyfuse3 3.5 has no handler for it, so the kernel answers EOPNOTSUPP.

Lifetime of an inode: it lives while it has a name (nlink > 0), the kernel still knows it
(lookup count > 0) or it is open. When its last name goes while it is still known, it is
recorded as an orphan and deleted on release/forget, or at the next mount after a crash.

Snapshots: with a `snapview.SnapshotViews` (the daemon passes one), the root folder has a
read-only `.snapshots` folder of the retained snapshots. Its inode numbers are virtual (at or
above `snapview.VIRTUAL_BASE`): every read-side request for one is the view's to answer, and
this module refuses every change to them with EROFS (create, mkdir, mknod, symlink, link,
unlink, rmdir, rename from or into, setattr, open for writing or truncating, setxattr,
removexattr); the kernel's forget of them touches nothing here. The name `.snapshots` in the
root folder is reserved: creating it (create, mkdir, mknod, symlink, link, rename onto it)
fails with EEXIST, removing or renaming it away with EPERM (the root folder itself is
writable: the operation, not the filesystem, is refused). By default the root folder's
listing does not show it (as ZFS's `snapdir=hidden`): `ls`, `cd`, `cp` and `rsync` reach it by
name, while `rsync -a`, `cp -a`, `du` or `find` of the whole mount do not walk every snapshot.
`-o snapdir=visible` lists it, last, at readdir offset `SNAPDIR_OFFSET` (above every offset of
a live entry), so offsets stay valid. A live entry named `.snapshots` made before this existed
is shadowed (it is still in the snapshots of its time).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import struct
import time
from typing import NoReturn

import pyfuse3

from .data import FileData
from .errors import IntegrityError
from .index import ROOT_INO, Attr, Index
from .snapview import DIR_NAME as SNAPDIR_NAME
from .snapview import DOT_OFFSET, DOTDOT_OFFSET, ENTRY_OFFSET_BASE, SNAPSHOTS_INO, SnapshotViews, is_virtual

log = logging.getLogger(__name__)

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
CACHE_TIMEOUT = 60.0  # only this daemon changes the tree, and the kernel sees every change
BLKSIZE = 1 << 17
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4  # overlayfs' whiteouts: not supported (EINVAL), as any other flag
COPIES_XATTR = b"user.bpfs.copies"
SNAPDIR_OFFSET = 1 << 62  # readdir offset of `.snapshots` in the root: after every live entry's
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"


def _boundary(handler=None, *, atomic=False):
    """Turn every failure of a request handler into a FUSEError with a fitting errno.

    With atomic=True (handlers that never await) the handler's index changes happen all
    or not at all.
    """
    if handler is None:
        return functools.partial(_boundary, atomic=atomic)

    @functools.wraps(handler)
    async def wrapper(self, *args, **kwargs):
        try:
            if not atomic:
                return await handler(self, *args, **kwargs)
            with self.index.atomic():
                result = await handler(self, *args, **kwargs)
            if self._durable_now:
                self._durable_now = False
                self.index.save()
            return result
        except pyfuse3.FUSEError:
            raise
        except OSError as e:  # a real I/O error of ours (the deliberate ones are FUSEErrors)
            if e.errno != errno.ENOSPC:
                log.warning("%s: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except IntegrityError as e:
            log.error("%s: damaged data: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _fail(code: int) -> NoReturn:
    raise pyfuse3.FUSEError(code)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        _fail(errno.ENAMETOOLONG)


# ----- POSIX ACLs in their xattr form (what the kernel sends and reads: linux/posix_acl_xattr.h) -----
_ACL_VERSION = 2
_ACL_HEADER = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")  # tag, permissions (rwx), uid or gid
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _acl_parse(value: bytes) -> list[list[int]]:
    """The entries [tag, perm, id] of an ACL; EINVAL unless it is valid (the kernel's
    posix_acl_valid: owner, named users, owning group, named groups, mask, other, in order, the mask
    present when named entries are)."""
    if len(value) < _ACL_HEADER.size or (len(value) - _ACL_HEADER.size) % _ACL_ENTRY.size \
            or _ACL_HEADER.unpack_from(value)[0] != _ACL_VERSION:
        _fail(errno.EINVAL)
    entries = [list(e) for e in _ACL_ENTRY.iter_unpack(value[_ACL_HEADER.size:])]
    state, needs_mask = ACL_USER_OBJ, False
    for tag, perm, _ in entries:
        if perm & ~7:
            _fail(errno.EINVAL)
        if tag == ACL_USER_OBJ and state == ACL_USER_OBJ:
            state = ACL_USER
        elif tag == ACL_USER and state == ACL_USER:
            needs_mask = True
        elif tag == ACL_GROUP_OBJ and state == ACL_USER:
            state = ACL_GROUP
        elif tag == ACL_GROUP and state == ACL_GROUP:
            needs_mask = True
        elif tag == ACL_MASK and state == ACL_GROUP:
            state = ACL_OTHER
        elif tag == ACL_OTHER and (state == ACL_OTHER or (state == ACL_GROUP and not needs_mask)):
            state = 0
        else:
            _fail(errno.EINVAL)
    if state != 0:
        _fail(errno.EINVAL)
    return entries


def _acl_bytes(entries) -> bytes:
    return _ACL_HEADER.pack(_ACL_VERSION) + b"".join(_ACL_ENTRY.pack(*e) for e in entries)


def _acl_mode(entries) -> tuple[int, bool]:
    """(permission bits the ACL gives the mode, whether the mode alone says it all): the group
    bits are the mask's when there is one (the kernel's posix_acl_equiv_mode)."""
    mode, equivalent = 0, True
    for tag, perm, _ in entries:
        if tag == ACL_USER_OBJ:
            mode |= perm << 6
        elif tag == ACL_GROUP_OBJ:
            mode |= perm << 3
        elif tag == ACL_OTHER:
            mode |= perm
        elif tag == ACL_MASK:
            mode = (mode & ~0o070) | perm << 3
            equivalent = False
        else:
            equivalent = False
    return mode, equivalent


def _acl_chmod(entries, mode: int) -> None:
    """A chmod on a file with an access ACL: the owner, mask (else owning group) and other entries
    take the new bits (the kernel's posix_acl_chmod)."""
    has_mask = any(e[0] == ACL_MASK for e in entries)
    for e in entries:
        if e[0] == ACL_USER_OBJ:
            e[1] = mode >> 6 & 7
        elif e[0] == ACL_MASK or (e[0] == ACL_GROUP_OBJ and not has_mask):
            e[1] = mode >> 3 & 7
        elif e[0] == ACL_OTHER:
            e[1] = mode & 7


def _acl_create(entries, mode: int) -> tuple[int, bool]:
    """A new inode under a default ACL: restrict the ACL (in place) and the mode by each other;
    returns (the new permission bits, whether the ACL says more than them) (posix_acl_create_masq)."""
    bits = mode & 0o777
    group = mask = None
    equivalent = True
    for e in entries:
        tag = e[0]
        if tag == ACL_USER_OBJ:
            e[1] &= bits >> 6
            bits &= e[1] << 6 | 0o077
        elif tag in (ACL_USER, ACL_GROUP):
            equivalent = False
        elif tag == ACL_GROUP_OBJ:
            group = e
        elif tag == ACL_OTHER:
            e[1] &= bits & 7
            bits &= e[1] | 0o770
        elif tag == ACL_MASK:
            mask = e
            equivalent = False
    owning = mask if mask is not None else group
    assert owning is not None  # a valid ACL has an ACL_GROUP_OBJ entry
    owning[1] &= bits >> 3 & 7
    bits &= owning[1] << 3 | 0o707
    return bits, not equivalent


class _Handle:
    __slots__ = ("ino", "wrote")

    def __init__(self, ino: int):
        self.ino = ino
        self.wrote = False


class BpfsOperations(pyfuse3.Operations):
    """The mount's request handlers.

    Attributes:
        index, data, store_dir: the live index, the file-data layer, the store's folder.
        views: the `.snapshots` folder (None: no such folder, as in the CLI's in-process use).
        show_snapshots: whether the root folder's listing shows `.snapshots` (`snapdir=visible`).
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = True  # FUSE_POSIX_ACL: the kernel checks ACLs (and turns on default_permissions)

    def __init__(self, index: Index, data: FileData, store_dir: str, copies=None,
                 views: SnapshotViews | None = None, show_snapshots: bool = False):
        super().__init__()
        self.index = index
        self.data = data
        self.store_dir = store_dir
        self.views = views
        self.show_snapshots = show_snapshots and views is not None
        if views is not None and index.lookup(ROOT_INO, SNAPDIR_NAME) is not None:
            log.warning("the root folder holds a %s of its own: the snapshots folder hides it (rename it from "
                        "a mount of an older version, or copy it out of a snapshot)", SNAPDIR_NAME.decode())
        # (pack ids, changed at ns) -> (partners holding them, target), or None: not known here
        self._copies = copies
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._lookups: dict[int, int] = {}
        self._open: dict[int, int] = {}
        self._durable_now = False  # set by a handler whose change must be durable on return
        self.lanes = data.lanes

    # ----- helpers -------------------------------------------------------------------------
    def _is_snapdir(self, parent_ino: int, name: bytes) -> bool:
        """Whether (parent, name) is the reserved `.snapshots` name in the root folder."""
        return self.views is not None and parent_ino == ROOT_INO and name == SNAPDIR_NAME

    def _writable(self, *inos: int) -> None:
        """EROFS for a change to anything in `.snapshots`."""
        if any(is_virtual(ino) for ino in inos):
            _fail(errno.EROFS)

    def _views(self) -> SnapshotViews:
        if self.views is None:
            _fail(errno.ENOENT)
        return self.views

    def _attr(self, ino: int) -> Attr:
        attr = self.index.get_attr(ino)
        if attr is None:
            _fail(errno.ENOENT)
        return attr

    def _dir_attr(self, ino: int) -> Attr:
        attr = self._attr(ino)
        if not stat.S_ISDIR(attr.mode):
            _fail(errno.ENOTDIR)
        return attr

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = attr.ino
        e.generation = 0
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink + (attr.ino == ROOT_INO and self.show_snapshots)  # `.snapshots` is a subfolder
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = BLKSIZE
        e.st_blocks = (attr.stored + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _seen(self, parent: int, name: bytes, attr: Attr) -> Attr:
        self.lanes.seen(parent, name, attr.ino, attr.mode)
        return attr

    def _looked_up(self, attr: Attr) -> pyfuse3.EntryAttributes:
        self._lookups[attr.ino] = self._lookups.get(attr.ino, 0) + 1
        return self._entry(attr)

    def _touch_dir(self, attr: Attr, now: int) -> None:
        attr.mtime_ns = attr.ctime_ns = now
        self.index.put_attr(attr)

    def _check_metadata_space(self) -> None:
        try:
            self.data.check_space(0)
        except OSError:
            _fail(errno.ENOSPC)

    def _after_change(self) -> None:
        self.data.checkpoint_if_large()

    def _new_inode(self, parent: Attr, mode: int, ctx, rdev: int = 0) -> Attr:
        now = time.time_ns()
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        attr = Attr(self.index.allocate_ino(), mode, ctx.uid, gid, 1, rdev, 0, 0, now, now, now, 0)
        return attr

    def _link_new(self, parent_ino: int, name: bytes, mode: int, ctx, rdev: int = 0) -> Attr:
        _check_name(name)
        self._writable(parent_ino)
        if self._is_snapdir(parent_ino, name):
            _fail(errno.EEXIST)
        parent = self._dir_attr(parent_ino)
        if self.index.lookup(parent_ino, name) is not None:
            _fail(errno.EEXIST)
        self._check_metadata_space()
        attr = self._new_inode(parent, mode, ctx, rdev)
        acls = self._inherited_acls(parent_ino, attr)
        if stat.S_ISDIR(mode):
            attr.nlink = 2
            attr.parent = parent_ino
            parent.nlink += 1
        self.index.put_attr(attr)
        for acl_name, acl in acls:
            self.index.put_xattr(attr.ino, acl_name, acl)
        self.index.add_entry(parent_ino, name, attr.ino)
        self._touch_dir(parent, attr.ctime_ns)
        self.lanes.created(parent_ino, name, attr)
        self._after_change()
        return attr

    def _inherited_acls(self, parent_ino: int, attr: Attr) -> list[tuple[bytes, bytes]]:
        """Under a folder with a default ACL, a new inode's ACLs (its mode restricted to match):
        an access ACL unless the mode says it all, and for a folder the default ACL too. The
        kernel leaves this to the filesystem. (It has applied the umask to the mode already,
        where a local filesystem would ignore the umask under a default ACL: pyfuse3 cannot ask
        for FUSE_CAP_DONT_MASK.)"""
        if stat.S_ISLNK(attr.mode):
            return []
        default = self.index.get_xattr(parent_ino, ACL_DEFAULT)
        if default is None:
            return []
        entries = _acl_parse(default)
        bits, extended = _acl_create(entries, attr.mode)
        attr.mode = attr.mode & ~0o777 | bits
        acls = [(ACL_ACCESS, _acl_bytes(entries))] if extended else []
        if stat.S_ISDIR(attr.mode):
            acls.append((ACL_DEFAULT, default))
        return acls

    def _release_if_unused(self, ino: int) -> None:
        attr = self.index.get_attr(ino)
        if attr is None or attr.nlink > 0:
            return
        if self._lookups.get(ino, 0) > 0 or self._open.get(ino, 0) > 0:
            self.index.add_orphan(ino)
            return
        self.destroy_inode(ino)

    def destroy_inode(self, ino: int) -> None:
        attr = self.index.get_attr(ino)
        with self.index.atomic():
            if attr is None or attr.stored or self.data.has_buffer(ino):
                self.data.forget_inode(ino)
            if attr is None or stat.S_ISLNK(attr.mode):
                self.index.delete_symlink(ino)
            self.index.delete_all_xattrs(ino)
            self.index.delete_attr(ino)
            self.index.remove_orphan(ino)
            self.lanes.destroyed(ino)

    def _drop_name(self, attr: Attr, now: int) -> None:
        attr.nlink = 0 if stat.S_ISDIR(attr.mode) else attr.nlink - 1
        attr.ctime_ns = now
        self.index.put_attr(attr)
        self._release_if_unused(attr.ino)

    # ----- lookups and attributes ------------------------------------------------------------
    @_boundary
    async def lookup(self, parent_inode, name, ctx=None):
        _check_name(name)
        if is_virtual(parent_inode):
            if parent_inode == SNAPSHOTS_INO and name == b"..":
                return self._looked_up(self._attr(ROOT_INO))
            return await self._views().lookup(parent_inode, name)
        if self._is_snapdir(parent_inode, name):
            return await self.views.folder_entry()
        if name == b".":
            return self._looked_up(self._dir_attr(parent_inode))
        if name == b"..":
            parent = self._dir_attr(parent_inode)
            return self._looked_up(self._attr(parent.parent or ROOT_INO))
        ino = self.index.lookup(parent_inode, name)
        if ino is None:
            self._dir_attr(parent_inode)
            _fail(errno.ENOENT)
        return self._looked_up(self._seen(parent_inode, name, self._attr(ino)))

    async def forget(self, inode_list):
        try:
            for ino, nlookup in inode_list:
                if is_virtual(ino):  # the views keep nothing per kernel reference
                    continue
                left = self._lookups.get(ino, 0) - nlookup
                if left > 0:
                    self._lookups[ino] = left
                else:
                    self._lookups.pop(ino, None)
                    self.lanes.forget(ino)
                    self._release_if_unused(ino)
        except Exception:
            log.exception("forget failed")

    @_boundary
    async def getattr(self, inode, ctx=None):
        if is_virtual(inode):
            return await self._views().getattr(inode)
        return self._entry(self._attr(inode))

    @_boundary
    async def setattr(self, inode, attr, fields, fh, ctx):
        self._writable(inode)
        a = self._attr(inode)
        now = time.time_ns()
        if fields.update_size:
            if stat.S_ISDIR(a.mode):
                _fail(errno.EISDIR)
            if attr.st_size < a.size or self.data.has_buffer(inode):
                await self.data.truncate(inode, attr.st_size)
                a = self._attr(inode)
            if inode in self.lanes.ignore_files:
                self.lanes.ignore_file_written(inode)
                self.lanes.ignore_file_closed(inode)
            if attr.st_size != a.size:
                a.size = attr.st_size
                if not fields.update_mtime:
                    a.mtime_ns = now
        with self.index.atomic():
            if fields.update_mode:
                a.mode = stat.S_IFMT(a.mode) | stat.S_IMODE(attr.st_mode)
                acl = self.index.get_xattr(inode, ACL_ACCESS)
                if acl is not None:  # the ACL's owner, mask (else group) and other entries follow
                    entries = _acl_parse(acl)
                    _acl_chmod(entries, a.mode)
                    self.index.put_xattr(inode, ACL_ACCESS, _acl_bytes(entries))
            if fields.update_uid:
                a.uid = attr.st_uid
            if fields.update_gid:
                a.gid = attr.st_gid
            if fields.update_atime:
                a.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                a.mtime_ns = attr.st_mtime_ns
            a.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
            self.index.put_attr(a)
        if fields.update_size:
            self.lanes.size_changed(inode)  # max_file_size: crossing it changes the lane
        self._after_change()
        return self._entry(a)

    @_boundary
    async def readlink(self, inode, ctx):
        if is_virtual(inode):
            return await self._views().readlink(inode)
        target = self.index.get_symlink(inode)
        if target is None:
            _fail(errno.EINVAL)
        return target

    @_boundary
    async def statfs(self, ctx):
        st = os.statvfs(self.store_dir)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        used = self.index.counter("last_ino")
        s.f_files = max(st.f_files, used)
        s.f_ffree = max(s.f_files - used, 0)
        s.f_favail = s.f_ffree
        s.f_namemax = NAME_MAX
        return s

    @_boundary
    async def access(self, inode, mode, ctx):
        if is_virtual(inode):
            await self._views().getattr(inode)
            if mode & os.W_OK:
                _fail(errno.EROFS)
            return True
        self._attr(inode)
        return True

    # ----- creating and removing names ------------------------------------------------------
    @_boundary(atomic=True)
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._looked_up(self._link_new(parent_inode, name, mode, ctx, rdev))

    @_boundary(atomic=True)
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._looked_up(self._link_new(parent_inode, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx))

    @_boundary(atomic=True)
    async def symlink(self, parent_inode, name, target, ctx):
        attr = self._link_new(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        attr.size = len(target)
        self.index.put_attr(attr)
        self.index.put_symlink(attr.ino, target)
        return self._looked_up(attr)

    @_boundary(atomic=True)
    async def create(self, parent_inode, name, mode, flags, ctx):
        attr = self._link_new(parent_inode, name, stat.S_IFREG | stat.S_IMODE(mode), ctx)
        fh = self._open_handle(attr.ino)
        self._handles[fh].wrote = True  # a closed new file exists, even when empty
        self.data.mark_written(attr.ino)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._looked_up(attr)

    @_boundary(atomic=True)
    async def link(self, inode, new_parent_inode, new_name, ctx):
        _check_name(new_name)
        self._writable(inode, new_parent_inode)
        if self._is_snapdir(new_parent_inode, new_name):
            _fail(errno.EEXIST)
        attr = self._attr(inode)
        if stat.S_ISDIR(attr.mode):
            _fail(errno.EPERM)
        parent = self._dir_attr(new_parent_inode)
        if self.index.lookup(new_parent_inode, new_name) is not None:
            _fail(errno.EEXIST)
        now = time.time_ns()
        attr.nlink += 1
        attr.ctime_ns = now
        self.index.put_attr(attr)
        if attr.nlink == 1:  # linkat() of an unlinked open file brings it back
            self.index.remove_orphan(inode)
        self.index.add_entry(new_parent_inode, new_name, inode)
        self._touch_dir(parent, now)
        self.lanes.linked(attr, new_parent_inode, new_name)
        self._after_change()
        return self._looked_up(attr)

    def _named(self, parent_inode: int, name: bytes) -> tuple[Attr, Attr]:
        """(directory, child) for an existing name, or ENOENT/ENOTDIR/ENAMETOOLONG; EROFS in
        `.snapshots`, EPERM for `.snapshots` itself (to remove or move away)."""
        _check_name(name)
        self._writable(parent_inode)
        if self._is_snapdir(parent_inode, name):
            _fail(errno.EPERM)
        parent = self._dir_attr(parent_inode)
        ino = self.index.lookup(parent_inode, name)
        if ino is None:
            _fail(errno.ENOENT)
        return parent, self._attr(ino)

    @_boundary(atomic=True)
    async def unlink(self, parent_inode, name, ctx):
        parent, attr = self._named(parent_inode, name)
        if stat.S_ISDIR(attr.mode):
            _fail(errno.EISDIR)
        now = time.time_ns()
        self.index.remove_entry(parent_inode, name)
        self._touch_dir(parent, now)
        self.lanes.unlinked(parent_inode, name, attr)
        self._drop_name(attr, now)
        self._after_change()

    @_boundary(atomic=True)
    async def rmdir(self, parent_inode, name, ctx):
        parent, attr = self._named(parent_inode, name)
        if not stat.S_ISDIR(attr.mode):
            _fail(errno.ENOTDIR)
        if self.index.has_entries(attr.ino):
            _fail(errno.ENOTEMPTY)
        now = time.time_ns()
        self.index.remove_entry(parent_inode, name)
        parent.nlink -= 1
        self._touch_dir(parent, now)
        self.lanes.unlinked(parent_inode, name, attr)
        self._drop_name(attr, now)
        self._after_change()

    @_boundary(atomic=True)
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            _fail(errno.EINVAL)  # RENAME_WHITEOUT (overlayfs) and unknown flags: refused, never ignored
        _check_name(name_new)
        self._writable(parent_inode_old, parent_inode_new)
        old_parent, attr = self._named(parent_inode_old, name_old)
        if self._is_snapdir(parent_inode_new, name_new):
            _fail(errno.EPERM if flags & RENAME_EXCHANGE else errno.EEXIST)
        ino = attr.ino
        new_parent = self._dir_attr(parent_inode_new) if parent_inode_new != parent_inode_old else old_parent
        target_ino = self.index.lookup(parent_inode_new, name_new)
        now = time.time_ns()
        if flags & RENAME_EXCHANGE:
            if target_ino is None:
                _fail(errno.ENOENT)
            target = self._attr(target_ino)
            self._exchange(old_parent, name_old, attr, new_parent, name_new, target, now)
            self.lanes.renamed(parent_inode_old, name_old, parent_inode_new, name_new, attr)
            self.lanes.renamed(parent_inode_new, name_new, parent_inode_old, name_old, target)
            return
        if target_ino is not None and flags & RENAME_NOREPLACE:
            _fail(errno.EEXIST)
        if target_ino == ino:
            return
        is_dir = stat.S_ISDIR(attr.mode)
        if target_ino is not None:
            target = self._attr(target_ino)
            if is_dir:
                if not stat.S_ISDIR(target.mode):
                    _fail(errno.ENOTDIR)
                if self.index.has_entries(target_ino):
                    _fail(errno.ENOTEMPTY)
                new_parent.nlink -= 1
            elif stat.S_ISDIR(target.mode):
                _fail(errno.EISDIR)
            else:
                # write-new-then-rename-over is how programs replace a file safely: make it
                # survive a crash before returning (ext4's auto_da_alloc protects this idiom)
                self._durable_now = True
            self.lanes.unlinked(parent_inode_new, name_new, target)
            self._drop_name(target, now)
        self.index.remove_entry(parent_inode_old, name_old)
        self.index.add_entry(parent_inode_new, name_new, ino)
        if is_dir and parent_inode_new != parent_inode_old:
            old_parent.nlink -= 1
            new_parent.nlink += 1
            attr.parent = parent_inode_new
        attr.ctime_ns = now
        self.index.put_attr(attr)
        self._touch_dir(old_parent, now)
        if new_parent is not old_parent:
            self._touch_dir(new_parent, now)
        self.lanes.renamed(parent_inode_old, name_old, parent_inode_new, name_new, attr)
        self._after_change()

    def _exchange(self, old_parent, name_old, a, new_parent, name_new, b, now):
        self.index.add_entry(old_parent.ino, name_old, b.ino)
        self.index.add_entry(new_parent.ino, name_new, a.ino)
        if old_parent is not new_parent:
            for moved, dest, src in ((a, new_parent, old_parent), (b, old_parent, new_parent)):
                if stat.S_ISDIR(moved.mode):
                    moved.parent = dest.ino
                    dest.nlink += 1
                    src.nlink -= 1
        for x in (a, b):
            x.ctime_ns = now
            self.index.put_attr(x)
        self._touch_dir(old_parent, now)
        if new_parent is not old_parent:
            self._touch_dir(new_parent, now)

    # ----- directories -----------------------------------------------------------------------
    @_boundary
    async def opendir(self, inode, ctx):
        if is_virtual(inode):
            await self._views().opendir(inode)
            return inode
        self._dir_attr(inode)
        return inode

    @_boundary
    async def readdir(self, fh, start_id, token):
        if is_virtual(fh):
            return await self._views().readdir(fh, start_id, token)
        snapdir = None
        if fh == ROOT_INO and self.views is not None:
            if start_id >= SNAPDIR_OFFSET:
                return
            if self.show_snapshots:
                snapdir = await self.views.folder_entry()  # before the listing: no await inside it
        here = self.index.get_attr(fh) if start_id < DOTDOT_OFFSET else None
        if here is not None:
            # `.` and `..` (the root's is itself): the kernel takes no reference from them (nothing
            # is counted as looked up) and uses only their inode numbers
            if start_id < DOT_OFFSET and not pyfuse3.readdir_reply(token, b".", self._entry(here), DOT_OFFSET):
                return
            up = self.index.get_attr(here.parent or ROOT_INO) or here
            if not pyfuse3.readdir_reply(token, b"..", self._entry(up), DOTDOT_OFFSET):
                return
        for next_id, name, ino in self.index.list_entries(fh, max(start_id - ENTRY_OFFSET_BASE, 0)):
            if fh == ROOT_INO and name == SNAPDIR_NAME and self.views is not None:
                continue  # shadowed by the snapshots folder
            attr = self.index.get_attr(ino)
            if attr is None:
                log.error("directory entry points to a missing inode %d", ino)
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), next_id + ENTRY_OFFSET_BASE):
                return
            self._lookups[ino] = self._lookups.get(ino, 0) + 1
            self.lanes.seen(fh, name, ino, attr.mode)
        if snapdir is not None:
            pyfuse3.readdir_reply(token, SNAPDIR_NAME, snapdir, SNAPDIR_OFFSET)

    async def releasedir(self, fh):
        pass

    @_boundary
    async def fsyncdir(self, fh, datasync):
        if is_virtual(fh):
            return
        await self.data.sync()

    # ----- files -------------------------------------------------------------------------
    def _open_handle(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(ino)
        self._open[ino] = self._open.get(ino, 0) + 1
        return fh

    @_boundary
    async def open(self, inode, flags, ctx):
        if is_virtual(inode):
            await self._views().open(inode, flags)
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = _Handle(inode)
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)  # a snapshot never changes
        attr = self._attr(inode)
        if stat.S_ISDIR(attr.mode):
            _fail(errno.EISDIR)
        if flags & os.O_TRUNC and stat.S_ISREG(attr.mode):  # libfuse asks for atomic O_TRUNC
            await self.data.truncate(inode, 0)
            attr = self._attr(inode)
            if attr.size:
                attr.size = 0
                attr.mtime_ns = attr.ctime_ns = time.time_ns()
                self.index.put_attr(attr)
                self.lanes.size_changed(inode)
                if inode in self.lanes.ignore_files:
                    self.lanes.ignore_file_written(inode)
        return pyfuse3.FileInfo(fh=self._open_handle(inode), keep_cache=flags & os.O_TRUNC == 0)

    @_boundary
    async def read(self, fh, off, size):
        h = self._handles[fh]
        if is_virtual(h.ino):
            return await self._views().read(h.ino, off, size)
        attr = self._attr(h.ino)
        return await self.data.read(h.ino, off, size, attr.size)

    @_boundary
    async def write(self, fh, off, buf):
        h = self._handles[fh]
        self._writable(h.ino)
        await self.data.write(h.ino, off, buf)
        h.wrote = True
        if h.ino in self.lanes.ignore_files:
            self.lanes.ignore_file_written(h.ino)
        attr = self._attr(h.ino)
        end = off + len(buf)
        if end > attr.size:
            attr.size = end
        attr.mtime_ns = attr.ctime_ns = time.time_ns()
        if attr.mode & (stat.S_ISUID | stat.S_ISGID):
            attr.mode &= ~stat.S_ISUID
        self.index.put_attr(attr)
        return len(buf)

    @_boundary
    async def flush(self, fh):
        h = self._handles[fh]
        if is_virtual(h.ino):
            return
        if h.wrote:
            await self.data.flush(h.ino)
            h.wrote = False
        if h.ino in self.lanes.ignore_dirty:
            self.lanes.ignore_file_closed(h.ino)

    @_boundary
    async def fsync(self, fh, datasync):
        h = self._handles[fh]
        if is_virtual(h.ino):
            return
        await self.data.flush_buffer(h.ino)
        await self.data.sync()

    @_boundary
    async def release(self, fh):
        h = self._handles.pop(fh)
        if is_virtual(h.ino):
            if self.views is not None:
                self.views.release(h.ino)
            return
        left = self._open.get(h.ino, 0) - 1
        if left > 0:
            self._open[h.ino] = left
        else:
            self._open.pop(h.ino, None)
            self._release_if_unused(h.ino)

    # ----- extended attributes ----------------------------------------------------------
    @_boundary(atomic=True)
    async def setxattr(self, inode, name, value, ctx):
        self._writable(inode)
        if name in (ACL_ACCESS, ACL_DEFAULT):
            self._set_acl(self._attr(inode), name, value)
            return
        if name.startswith(b"system."):
            _fail(errno.EOPNOTSUPP)
        if name == COPIES_XATTR:
            _fail(errno.EPERM)
        if len(name) > XATTR_NAME_MAX or not name:
            _fail(errno.ERANGE)
        if len(value) > XATTR_VALUE_MAX:
            _fail(errno.E2BIG)
        attr = self._attr(inode)
        self.index.put_xattr(inode, name, value)
        attr.ctime_ns = time.time_ns()
        self.index.put_attr(attr)

    def _set_acl(self, attr: Attr, name: bytes, value: bytes) -> None:
        """Store a POSIX ACL (the kernel checked who may, and enforces it). An access ACL sets the
        mode's permission bits (the group bits are its mask) and is kept only when it says more
        than they do; a default ACL is for folders only (inherited by what is created in them)."""
        if stat.S_ISLNK(attr.mode):
            _fail(errno.EOPNOTSUPP)
        if len(value) > XATTR_VALUE_MAX:
            _fail(errno.E2BIG)
        entries = _acl_parse(value)
        if name == ACL_DEFAULT:
            if not stat.S_ISDIR(attr.mode):
                _fail(errno.EACCES)
            self.index.put_xattr(attr.ino, name, _acl_bytes(entries))
        else:
            bits, equivalent = _acl_mode(entries)
            attr.mode = attr.mode & ~0o777 | bits
            if equivalent:
                self.index.delete_xattr(attr.ino, name)
            else:
                self.index.put_xattr(attr.ino, name, _acl_bytes(entries))
        attr.ctime_ns = time.time_ns()
        self.index.put_attr(attr)

    @_boundary
    async def getxattr(self, inode, name, ctx):
        if is_virtual(inode):  # user.bpfs.copies is about live files: not offered here (ENODATA)
            return await self._views().getxattr(inode, name)
        attr = self._attr(inode)
        if name == COPIES_XATTR:
            return self._copies_of(attr)
        value = self.index.get_xattr(inode, name)
        if value is None:
            _fail(pyfuse3.ENOATTR)
        return value

    def _copies_of(self, attr: Attr) -> bytes:
        counted = None
        if self._copies is not None:
            packs = set()
            for e in self.index.extents(attr.ino):
                rec = self.index.get_chunk(e.chunk_id)
                if rec is not None:
                    packs.add(rec.pack)
            counted = self._copies(packs, max(attr.ctime_ns, attr.mtime_ns))
        if counted is None:
            _fail(pyfuse3.ENOATTR)  # no partner service here (a read-only mount)
        return b"%d/%d" % counted

    @_boundary
    async def listxattr(self, inode, ctx):
        if is_virtual(inode):
            return await self._views().listxattr(inode)
        self._attr(inode)
        return self.index.list_xattrs(inode)

    @_boundary(atomic=True)
    async def removexattr(self, inode, name, ctx):
        self._writable(inode)
        if name == COPIES_XATTR:
            _fail(errno.EPERM)
        attr = self._attr(inode)
        if not self.index.delete_xattr(inode, name):
            _fail(pyfuse3.ENOATTR)
        attr.ctime_ns = time.time_ns()
        self.index.put_attr(attr)
