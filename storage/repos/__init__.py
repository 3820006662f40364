"""One repository per domain; callers never build SQL themselves."""

from storage.repos.attachments import AttachmentRepo
from storage.repos.accounts import AccountRepo, InviteRecord, SessionRecord, UserRecord
from storage.repos.devices import DeviceRecord, DeviceRepo, NewDevice
from storage.repos.messages import MessageRepo
from storage.repos.profiles import Avatar, AvatarInfo, ProfileRecord, ProfileRepo

__all__ = [
    "AccountRepo", "AttachmentRepo", "Avatar", "AvatarInfo", "DeviceRecord", "DeviceRepo", "InviteRecord", "MessageRepo", "NewDevice",
    "ProfileRecord", "ProfileRepo", "SessionRecord", "UserRecord",
]
