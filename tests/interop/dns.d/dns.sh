# shellcheck shell=bash
# DNS checks with dig (sourced by run.sh; uses ok/bad/skip/have). Set-up: backends.pre.sh and
# dns.yaml in this directory.
if have dig; then
  D=(dig -p 28253 @127.0.0.1 +time=2 +tries=1)
  vip=$("${D[@]}" +short dnsweb.meshgate A 2>&1)
  if [[ $vip =~ ^127\.77\.[0-9]+\.[0-9]+$ ]]; then ok "dig A dnsweb.meshgate -> VIP $vip"; else bad "A dnsweb: '$vip'"; fi
  bare=$("${D[@]}" +short dnsweb A 2>&1)
  if [ "$bare" = "$vip" ]; then ok "dig A dnsweb (bare name) -> same VIP"; else bad "bare name: '$bare' vs '$vip'"; fi
  tasks=$("${D[@]}" +short tasks.dnsweb.meshgate A 2>&1 | sort | tr '\n' ' ')
  if [ "$tasks" = "127.0.0.2 127.0.0.3 " ]; then ok "dig A tasks.dnsweb -> endpoint IPs"; else bad "tasks.dnsweb: '$tasks'"; fi
  srv=$("${D[@]}" +short _28200._tcp.dnsweb.meshgate SRV 2>&1)
  if [[ $srv =~ ^[0-9]+\ [0-9]+\ 28200\ dnsweb\.meshgate\.$ ]]; then ok "dig SRV _28200._tcp.dnsweb -> port 28200 on dnsweb.meshgate."; else bad "SRV: '$srv'"; fi
  out=$("${D[@]}" nosuch.meshgate A 2>&1)
  if grep -q "status: NXDOMAIN" <<<"$out" && grep -q "ANSWER: 0" <<<"$out"; then ok "dig unknown name -> NXDOMAIN"; else bad "NXDOMAIN: $out"; fi
  out=$("${D[@]}" dnsweb.meshgate AAAA 2>&1)
  if grep -q "status: NOERROR" <<<"$out" && grep -q "ANSWER: 0" <<<"$out" && grep -q "SOA" <<<"$out"; then
    ok "dig AAAA of a v4-only service -> NODATA (NOERROR, 0 answers, SOA)"; else bad "NODATA: $out"; fi
  ttl=$("${D[@]}" +noall +answer dnsweb.meshgate A 2>&1 | awk '{print $2}')
  if [ "$ttl" = "7" ]; then ok "answer TTL is the configured 7"; else bad "TTL: '$ttl'"; fi
  ptr=$("${D[@]}" +short -x "$vip" 2>&1)
  if [ "$ptr" = "dnsweb.meshgate." ]; then ok "dig -x VIP -> dnsweb.meshgate."; else bad "PTR: '$ptr'"; fi
  tcp=$("${D[@]}" +tcp +short tasks.dnsweb.meshgate A 2>&1 | sort | tr '\n' ' ')
  if [ "$tcp" = "127.0.0.2 127.0.0.3 " ]; then ok "dig +tcp answers too"; else bad "DNS over TCP: '$tcp'"; fi
  out=$("${D[@]}" example.com A 2>&1)
  if grep -q "status: REFUSED" <<<"$out"; then ok "names outside the zone are REFUSED with forward: false"; else bad "outside zone: $out"; fi
  # The VIP port reaches both backends.
  if [[ $vip =~ ^127\. ]]; then
    wait_port "$vip" 28200
    names=$(for i in 1 2 3 4; do curl -s --max-time 3 "http://$vip:28200/"; done | sort -u | tr '\n' ' ')
    if [ "$names" = "d2 d3 " ]; then ok "curl http://VIP:28200/ reaches both endpoints"; else bad "VIP curl got '$names'"; fi
  fi
  # A service published on the wildcard address (web, 0.0.0.0:28080) is reachable on its VIP too.
  wvip=$("${D[@]}" +short web.meshgate A 2>&1)
  names=$(for i in 1 2 3 4; do curl -s --max-time 3 "http://$wvip:28080/"; done | sort -u | tr '\n' ' ')
  if [ "$names" = "b1 b2 " ]; then ok "curl http://VIP:28080/ of a wildcard-bound port reaches both endpoints"; else bad "wildcard VIP $wvip got '$names'"; fi
else skip "dig not installed (apt-get install bind9-dnsutils)"; fi
