# %systemd_postun_with_restart: reload units; on upgrade try-restart kilnd
# (VMs keep running and are re-adopted). On removal, drop runtime files.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ $1 -ge 1 ]; then
    systemctl try-restart kilnd.service >/dev/null 2>&1 || :
else
    rm -rf /run/kiln
    # cargo-generate-rpm cannot own directories: remove ours when empty.
    rmdir /usr/lib/kiln/guest /usr/lib/kiln/pools.d /usr/lib/kiln /usr/share/kiln \
        /usr/share/doc/kiln 2>/dev/null || :
fi
