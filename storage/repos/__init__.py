"""One repository per domain; callers never build SQL themselves."""

from storage.repos.accounts import AccountRepo, InviteRecord, SessionRecord, UserRecord
from storage.repos.devices import DeviceRecord, DeviceRepo, NewDevice
from storage.repos.messages import MessageRepo

__all__ = [
    "AccountRepo", "DeviceRecord", "DeviceRepo", "InviteRecord", "MessageRepo", "NewDevice",
    "SessionRecord", "UserRecord",
]
