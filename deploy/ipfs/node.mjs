#!/usr/bin/env node
// Local js-ipfs (0.66.1 / ipfs-core 0.18.1) node serving the Kubo-compatible
// HTTP RPC API (/api/v0) for pinq development and tests.
//
// Usage: node node.mjs [--repo DIR] [--api-port N] [--gateway-port N]
//   --repo DIR          repo directory       (env IPFS_REPO,         default <script dir>/.repo)
//   --api-port N        RPC API port          (env IPFS_API_PORT,     default 5001; 0 = pick a free port)
//   --gateway-port N    HTTP gateway port     (env IPFS_GATEWAY_PORT, default: gateway disabled)
//
// The node is offline (libp2p not started): no swarm listeners, no bootstrap,
// no preload, no MDNS, Routing.Type=none. Everything binds to 127.0.0.1, so
// several instances (different repos + ports) can run side by side.
// Prints "IPFS API ready on http://127.0.0.1:PORT" once the API listens.
// A stale repo.lock is removed on start; <repo>/node.pid records the owner.
// SIGTERM/SIGINT: stop HTTP servers + node (releases the lock), exit 0.

import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { create } from 'ipfs-core'
import { HttpApi } from 'ipfs-http-server'

const HOST = '127.0.0.1'
const scriptDir = path.dirname(fileURLToPath(import.meta.url))

function usage (msg) {
  if (msg) console.error(`error: ${msg}`)
  console.error('usage: node node.mjs [--repo DIR] [--api-port N] [--gateway-port N]')
  process.exit(2)
}

let args
try {
  args = parseArgs({
    options: {
      repo: { type: 'string' },
      'api-port': { type: 'string' },
      'gateway-port': { type: 'string' },
      help: { type: 'boolean', short: 'h' }
    },
    strict: true
  }).values
} catch (err) {
  usage(err.message)
}
if (args.help) usage()

function parsePort (name, value) {
  if (value === undefined || value === '') return undefined
  if (!/^\d+$/.test(value) || Number(value) > 65535) usage(`invalid ${name}: ${value}`)
  return Number(value)
}

const repoDir = path.resolve(args.repo ?? process.env.IPFS_REPO ?? path.join(scriptDir, '.repo'))
const apiPort = parsePort('--api-port', args['api-port'] ?? process.env.IPFS_API_PORT) ?? 5001
const gatewayPort = parsePort('--gateway-port', args['gateway-port'] ?? process.env.IPFS_GATEWAY_PORT)

// A repo.lock left behind by a killed process would make repo.open() fail, so
// it is removed before start -- unless node.pid names a process that is still
// alive (two live nodes must never share a repo; use one repo per instance).
const lockPath = path.join(repoDir, 'repo.lock')
const pidPath = path.join(repoDir, 'node.pid')

function liveOwner () {
  let pid
  try { pid = Number(fs.readFileSync(pidPath, 'utf8').trim()) } catch { return undefined }
  if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) return undefined
  try { process.kill(pid, 0) } catch (err) { if (err.code !== 'EPERM') return undefined }
  try { // guard against PID reuse where /proc is available
    const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8')
    if (!cmd.includes('node')) return undefined
  } catch {}
  return pid
}

if (fs.existsSync(lockPath)) {
  const owner = liveOwner()
  if (owner !== undefined) {
    console.error(`[ipfs-node] repo ${repoDir} is in use by running process ${owner}`)
    process.exit(1)
  }
  fs.rmSync(lockPath, { recursive: true, force: true })
}
fs.mkdirSync(repoDir, { recursive: true })

const log = (...a) => console.error('[ipfs-node]', ...a)

let ipfs
let httpApi
let httpGateway
let stopping = false

async function shutdown (signal) {
  if (stopping) return
  stopping = true
  log(`received ${signal}, shutting down`)
  const force = setTimeout(() => { log('forced exit'); process.exit(1) }, 10000)
  force.unref()
  let code = 0
  try {
    const t0 = Date.now()
    await Promise.all([httpApi?.stop(), httpGateway?.stop()])
    const t1 = Date.now()
    await ipfs?.stop() // closes the repo and releases repo.lock
    fs.rmSync(pidPath, { force: true })
    log(`stopped (http ${t1 - t0}ms, ipfs ${Date.now() - t1}ms)`)
  } catch (err) {
    log('error during shutdown:', err)
    code = 1
  }
  // Exit explicitly: abandoned requests (e.g. a pin/add without timeout whose
  // client went away) can leave timers behind that would keep the loop alive.
  process.exit(code)
}
process.on('SIGTERM', () => { shutdown('SIGTERM') })
process.on('SIGINT', () => { shutdown('SIGINT') })

try {
  const t0 = Date.now()
  ipfs = await create({
    repo: repoDir,
    repoAutoMigrate: true,
    init: { emptyRepo: true, algorithm: 'Ed25519' }, // no init docs => zero pins
    start: true,
    offline: true, // libp2p is not started: no swarm, no DHT, no bitswap to peers
    preload: { enabled: false },
    relay: { enabled: false, hop: { enabled: false } },
    silent: true,
    // Applied on every start (merged into the repo config), so ports can change.
    config: {
      Addresses: {
        API: `/ip4/${HOST}/tcp/${apiPort}`,
        Gateway: gatewayPort !== undefined ? `/ip4/${HOST}/tcp/${gatewayPort}` : '',
        RPC: '',
        Swarm: [],
        Announce: [],
        NoAnnounce: [],
        Delegates: []
      },
      Bootstrap: [],
      Discovery: {
        MDNS: { Enabled: false },
        webRTCStar: { Enabled: false }
      },
      Swarm: { DisableNatPortMap: true },
      Routing: { Type: 'none' },
      Pubsub: { Enabled: false }
    }
  })
  if (stopping) throw new Error('interrupted during startup')

  httpApi = new HttpApi(ipfs)
  await httpApi.start()

  if (gatewayPort !== undefined) {
    const { HttpGateway } = await import('ipfs-http-gateway')
    httpGateway = new HttpGateway(ipfs)
    await httpGateway.start()
    const gw = httpGateway._gatewayServers?.[0]?.info
    log(`gateway listening on http://${HOST}:${gw?.port ?? gatewayPort}`)
  }

  fs.writeFileSync(pidPath, `${process.pid}\n`)
  const port = httpApi._apiServers?.[0]?.info?.port ?? apiPort
  log(`repo ${repoDir}, started in ${((Date.now() - t0) / 1000).toFixed(2)}s`)
  process.stdout.write(`IPFS API ready on http://${HOST}:${port}\n`)
} catch (err) {
  log('failed to start:', err?.stack ?? err)
  try { await httpApi?.stop() } catch {}
  try { await ipfs?.stop() } catch {}
  process.exit(1)
}
