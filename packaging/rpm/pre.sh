# %pre: the kiln user and group before any file is owned by them
# (%sysusers_create_compat).
if [ -x /usr/bin/systemd-sysusers ]; then
    cat <<'SYSUSERS' | systemd-sysusers --replace=/usr/lib/sysusers.d/kiln.conf - || :
u kiln - "Kiln microVM manager" /var/lib/kiln
SYSUSERS
fi
