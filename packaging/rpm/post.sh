# %post: sysusers and tmpfiles (%tmpfiles_create; in an installroot
# without /proc this waits for the first boot's systemd-tmpfiles-setup),
# then %systemd_post: on first installation, apply the preset of
# kilnd.socket (80-kiln.preset enables it; kilnd.service is static). As
# with every rpm, units start at the next boot or with
# `systemctl start kilnd.socket`.
systemd-sysusers /usr/lib/sysusers.d/kiln.conf >/dev/null 2>&1 || :
systemd-tmpfiles --create /usr/lib/tmpfiles.d/kiln.conf >/dev/null 2>&1 || :
if [ $1 -eq 1 ]; then
    systemctl --no-reload preset kilnd.socket >/dev/null 2>&1 || :
fi
