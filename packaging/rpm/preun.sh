# %systemd_preun: on removal (not upgrade) disable and stop the units, then
# end the VMs kilnd leaves running.
if [ $1 -eq 0 ]; then
    systemctl --no-reload disable --now kilnd.socket kilnd.service >/dev/null 2>&1 || :
    /usr/lib/kiln/kiln-stop-vms || :
fi
