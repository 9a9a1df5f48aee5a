"""The simulated address space: x86-64 with 4-level paging and 4 KiB pages."""
from __future__ import annotations

import sys
from array import array
from typing import Iterable

from services.common.errors import InvalidArgument, OutOfRange

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
LEVEL_BITS = 9
PTRS_PER_TABLE = 1 << LEVEL_BITS          # 512 entries per table at every level
VA_BITS = 48
USER_VA_END = 1 << (VA_BITS - 1)          # user space is the canonical lower half
USER_VPN_END = USER_VA_END >> PAGE_SHIFT  # 2**35 pages
PTE_TABLE_PAGES = PTRS_PER_TABLE          # one PTE table maps 2 MiB


def is_canonical(address: int) -> bool:
    """Bits 63..47 must all equal bit 47 (x86-64 canonical form)."""
    top = address >> (VA_BITS - 1)
    return top == 0 or top == (1 << (64 - VA_BITS + 1)) - 1


def vpn_of(address: int) -> int:
    """The page number of a byte address, checked for canonical user space."""
    if not 0 <= address < 1 << 64:
        raise InvalidArgument(f"address {address:#x} is not a 64-bit value")
    if not is_canonical(address):
        raise InvalidArgument(f"address {address:#x} is not canonical")
    if address >= USER_VA_END:
        raise OutOfRange(f"address {address:#x} is in the kernel half, past the 47-bit user space")
    return address >> PAGE_SHIFT


# A little-endian uint64 below USER_VA_END has these bytes zero, and this one below
# _TOP_LIMIT: what `user_addresses` checks with strided slices, in C.
_TOP_BYTE = (VA_BITS - 1) // 8
_TOP_LIMIT = 1 << (VA_BITS - 1) % 8
_TOP_OVER = bytes(range(_TOP_LIMIT))  # deleted: what remains is over the limit


def user_addresses(packed: bytes) -> array:
    """Byte addresses packed as little-endian uint64s, checked for user space as
    `vpn_of` would (it names the first bad one), without making a Python int of each."""
    if len(packed) % 8:
        raise InvalidArgument(f"packed addresses of {len(packed)} bytes: 8 bytes each")
    n = len(packed) // 8
    if any(packed[k::8].count(0) != n for k in range(_TOP_BYTE + 1, 8)) or \
            packed[_TOP_BYTE::8].translate(None, _TOP_OVER):
        for address in _uint64s(packed):
            vpn_of(address)
    return _uint64s(packed)


def pack_addresses(addresses: Iterable[int]) -> bytes:
    """The little-endian uint64s `user_addresses` reads (AccessRequest.packed_addresses)."""
    values = array("Q", addresses)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _uint64s(packed: bytes) -> array:
    values = array("Q")
    values.frombytes(packed)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def page_range(address: int, pages: int) -> tuple[int, int]:
    """Validate a page-aligned range; return (first vpn, end vpn)."""
    if address % PAGE_SIZE:
        raise InvalidArgument(f"address {address:#x} is not page-aligned")
    start = vpn_of(address)
    if pages <= 0:
        raise InvalidArgument(f"length of {pages} pages: must be at least 1")
    if start + pages > USER_VPN_END:
        raise OutOfRange(
            f"range {address:#x} + {pages} pages ends past the 47-bit user address space")
    return start, start + pages


def table_index(vpn: int, level: int) -> int:
    """Index into the table at `level` (1 = PTE table ... 4 = PGD)."""
    return (vpn >> (LEVEL_BITS * (level - 1))) & (PTRS_PER_TABLE - 1)
