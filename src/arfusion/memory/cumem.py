"""CUDA virtual memory (cuMem) buffers shared by FABRIC handles or POSIX file descriptors.

Each rank creates physical memory with `cuMemCreate`, maps it into a reserved
address range (`cuMemAddressReserve`, `cuMemMap`, `cuMemSetAccess`) and exports a
shareable handle: a FABRIC handle where every rank's device supports them (NVLink
domains across nodes; plain bytes, exchanged with `comm.allgather`), otherwise a
POSIX file descriptor (one node; passed between processes over Unix-domain
sockets with SCM_RIGHTS). Every rank imports every peer's handle and maps it the
same way. Ranks that are threads of one process use each other's mappings
directly. Sizes are rounded up to the allocation granularity. No multicast
object is ever created.

Closing unmaps and frees every address range and releases every handle; the
physical memory returns to the driver once the last rank has unmapped it, so a
rank may close without its peers (they keep their own mappings). Ranks that are
threads of one process write through each other's address ranges: those are kept
unless every rank came to the close.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import uuid

import torch

from ..comm import BoundedSteps, is_in_process
from . import SymmetricBuffer, check, wrap_pointer


def _driver():
    from cuda.bindings import driver

    check(driver.cuInit(0))
    return driver


def device_supports(device: torch.device, attribute: str) -> bool:
    """A CU_DEVICE_ATTRIBUTE_* flag of `device` (e.g. HANDLE_TYPE_FABRIC_SUPPORTED)."""
    drv = _driver()
    dev = check(drv.cuDeviceGet(device.index))
    attr = getattr(drv.CUdevice_attribute, f"CU_DEVICE_ATTRIBUTE_{attribute}")
    return bool(check(drv.cuDeviceGetAttribute(attr, dev)))


@functools.cache
def fabric_supported(device: torch.device) -> bool:
    """Whether FABRIC handles can really be created and exported here.

    The device attribute is not enough: without an IMEX channel (multi-node NVLink
    set-up) cuMemCreate refuses FABRIC handles with CUDA_ERROR_NOT_PERMITTED, so a
    granule is created and exported once to find out."""
    if not device_supports(device, "HANDLE_TYPE_FABRIC_SUPPORTED"):
        return False
    drv = _driver()
    fabric = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_FABRIC
    prop = _allocation_prop(drv, device, fabric)
    gran = check(drv.cuMemGetAllocationGranularity(
        prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM))
    with torch.cuda.device(device):
        err, handle = drv.cuMemCreate(gran, prop, 0)
        if int(err) != 0:
            return False
        try:
            return int(drv.cuMemExportToShareableHandle(handle, fabric, 0)[0]) == 0
        finally:
            check(drv.cuMemRelease(handle))


def _allocation_prop(drv, device: torch.device, handle_type):
    prop = drv.CUmemAllocationProp()
    prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device.index
    prop.requestedHandleTypes = handle_type
    return prop


class CuMemBuffer(SymmetricBuffer):
    def __init__(self, setup: BoundedSteps, nbytes: int, device: torch.device):
        super().__init__(setup, nbytes, device)
        drv = self._drv = _driver()
        in_process = is_in_process(setup.comm)
        census = "device census"
        # Threads of one process use each other's mappings: grant all their devices.
        self._devices = sorted(set(setup.allgather(device.index, census))) if in_process \
            else [device.index]
        use_fabric = not in_process and all(setup.allgather(fabric_supported(device), census))
        handle_types = drv.CUmemAllocationHandleType
        self.handle_type = (handle_types.CU_MEM_HANDLE_TYPE_FABRIC if use_fabric
                            else handle_types.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        prop = _allocation_prop(drv, device, self.handle_type)
        gran = check(drv.cuMemGetAllocationGranularity(
            prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        self.size = -(-nbytes // gran) * gran
        self._gran = gran
        self._mapped: list[int] = []  # address ranges this rank mapped (own and peers')
        with torch.cuda.device(device):
            self._handle = check(drv.cuMemCreate(self.size, prop, 0))
            local = self._map(self._handle)
        self.local = wrap_pointer(local, nbytes, device)
        self._in_process = in_process
        exchange = "handle exchange"
        try:
            if in_process:
                self.peer_ptrs = list(setup.allgather(local, exchange))
                return
            exported = check(drv.cuMemExportToShareableHandle(self._handle, self.handle_type, 0))
            peers = (setup.allgather(bytes(exported.data), exchange) if use_fabric
                     else exchange_fds(setup, exported))
        except RuntimeError:
            self.abandon()
            raise
        self.peer_ptrs = []
        with torch.cuda.device(device):
            for r, shared in enumerate(peers):
                self.peer_ptrs.append(local if r == self.rank else self._import(shared))

    def _map(self, handle) -> int:
        drv = self._drv
        ptr = check(drv.cuMemAddressReserve(self.size, self._gran, 0, 0))
        check(drv.cuMemMap(ptr, self.size, 0, handle, 0))
        grants = []
        for index in self._devices:
            access = drv.CUmemAccessDesc()
            access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            access.location.id = index
            access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
            grants.append(access)
        check(drv.cuMemSetAccess(ptr, self.size, grants, len(grants)))
        self._mapped.append(int(ptr))
        return int(ptr)

    def _import(self, shared) -> int:
        drv = self._drv
        if isinstance(shared, bytes):
            fabric = drv.CUmemFabricHandle()
            fabric.data = shared
            handle = check(drv.cuMemImportFromShareableHandle(fabric, self.handle_type))
        else:
            try:
                handle = check(drv.cuMemImportFromShareableHandle(shared, self.handle_type))
            finally:
                os.close(shared)
        try:
            return self._map(handle)
        finally:
            check(drv.cuMemRelease(handle))  # the mapping keeps the memory alive

    def abandon(self) -> None:
        if self._in_process:
            super().abandon()
        else:
            self._free(0.0)

    def _free(self, timeout_s: float) -> bool:
        drv = self._drv
        del self.local
        with torch.cuda.device(self.device):
            for ptr in self._mapped:
                check(drv.cuMemUnmap(ptr, self.size))
                check(drv.cuMemAddressFree(ptr, self.size))
            self._mapped.clear()
            check(drv.cuMemRelease(self._handle))
        return True


def exchange_fds(setup: BoundedSteps, fd: int) -> list[int | None]:
    """Every rank's file descriptor, as a descriptor valid in this process (None for
    this rank's own). Each rank listens on an abstract Unix socket, and sends its
    descriptor to every peer over SCM_RIGHTS. Collective."""
    rank, size = setup.Get_rank(), setup.Get_size()
    name = f"\0arfusion-{uuid.uuid4().hex}-{rank}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(size)
    names = setup.allgather(name, "socket names")
    received: dict[int, int] = {}

    def accept() -> None:
        for _ in range(size - 1):
            conn, _ = server.accept()
            with conn:
                msg, fds, _, _ = socket.recv_fds(conn, 16, 1)
                received[int(msg.decode())] = fds[0]

    listener = threading.Thread(target=accept, daemon=True)
    listener.start()
    try:
        for peer in range(size):
            if peer != rank:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(names[peer])
                    socket.send_fds(s, [str(rank).encode()], [fd])
        listener.join(timeout=120)
        if listener.is_alive() or len(received) != size - 1:
            raise RuntimeError("file-descriptor exchange with the peers did not complete")
        setup.barrier("descriptor exchange")
    finally:
        server.close()
        os.close(fd)
    return [received.get(r) for r in range(size)]
