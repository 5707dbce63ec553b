//! A session's shard from the server: from the cache or downloaded, checked
//! against the length and SHA-256 the welcome announces, and held in memory — or,
//! larger than `--shard-memory`, streamed into the cache on disk and read by offset.

use std::sync::Arc;
use std::time::Duration;

use tether_dataset::{self as dataset, Cached, PackedSet, ShardCache, ShardKey};
use tether_shared::data::{ImageSet, Images, decode_images};
use tether_shared::protocol::Welcome;

use crate::connect::Endpoint;

/// What fetching a shard needs from the session.
pub(crate) struct Fetch<'a> {
    /// The server.
    pub endpoint: &'a Endpoint,
    /// Where shards are kept (`None`: in memory only).
    pub cache: Option<&'a ShardCache>,
    /// Bytes above which a shard stays on disk (with a cache).
    pub shard_memory: u64,
    /// Where the download is said.
    pub bar: &'a indicatif::ProgressBar,
}

/// The shard `welcome` announces (which must announce one), and where it came from
/// (`cache`, `download`, or either `(on disk)`); errors say why, for a reconnect.
pub(crate) async fn shard(
    fetch: &Fetch<'_>,
    welcome: &Welcome,
    key: &ShardKey,
) -> Result<(Arc<dyn Images>, &'static str), String> {
    let download = welcome
        .download
        .as_ref()
        .ok_or("the server announced no shard download")?;
    // Announced by the server; refused beyond 8 GiB all the same.
    if download.bytes > 8 << 30 {
        return Err(format!(
            "a shard of {} bytes is implausible",
            download.bytes
        ));
    }
    Ok(match fetch.cache {
        Some(cache) if download.bytes > fetch.shard_memory => {
            let (set, from) = on_disk(fetch, cache, welcome, key).await?;
            (Arc::new(set), from)
        }
        _ => {
            let (set, from) = in_memory(fetch, welcome, key).await?;
            (Arc::new(set), from)
        }
    })
}

/// The shard in memory: from the cache, or downloaded (and cached).
async fn in_memory(
    fetch: &Fetch<'_>,
    welcome: &Welcome,
    key: &ShardKey,
) -> Result<(ImageSet, &'static str), String> {
    let download = welcome.download.as_ref().ok_or("no shard download")?;
    let cached = match fetch.cache {
        Some(cache) => cache.load(key, download.bytes, &download.sha256),
        None => Cached::Miss,
    };
    let (bytes, from) = match cached {
        Cached::Hit(bytes) => {
            tracing::info!(shard = %shard_name(welcome), "using the cached shard");
            (bytes, "cache")
        }
        other => {
            if other == Cached::Corrupt {
                tracing::warn!(
                    "the cached shard did not match the server's digest; downloading it again"
                );
            }
            let mut bytes = Vec::new();
            fetch_into(fetch, welcome, &mut |chunk| {
                bytes.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
            if !dataset::verify(&bytes, download.bytes, &download.sha256) {
                return Err("the downloaded shard does not match its SHA-256".into());
            }
            if let Some(cache) = fetch.cache {
                match cache.store(key, &bytes) {
                    Ok(path) => tracing::info!(path = %path.display(), "shard verified and cached"),
                    Err(e) => tracing::warn!("could not cache the shard: {e}"),
                }
            }
            (bytes, "download")
        }
    };
    let set = decode_images("downloaded shard", &bytes)
        .map_err(|e| format!("the shard does not decode: {e}"))?;
    Ok((set, from))
}

/// A shard larger than `--shard-memory`, kept in the cache on disk (streamed there
/// when it is not already) and read by offset: only its labels are held.
async fn on_disk(
    fetch: &Fetch<'_>,
    cache: &ShardCache,
    welcome: &Welcome,
    key: &ShardKey,
) -> Result<(PackedSet, &'static str), String> {
    let download = welcome.download.as_ref().ok_or("no shard download")?;
    let (path, from) = match cache.load_file(key, download.bytes, &download.sha256) {
        Cached::OnDisk(path) => (path, "cache (on disk)"),
        other => {
            if other == Cached::Corrupt {
                tracing::warn!(
                    "the cached shard did not match the server's digest; downloading it again"
                );
            }
            let mut writer = cache
                .writer(key)
                .map_err(|e| format!("cannot cache the shard: {e}"))?;
            fetch_into(fetch, welcome, &mut |chunk| writer.write(chunk)).await?;
            let path = writer.finish(download.bytes, &download.sha256)?;
            (path, "download (on disk)")
        }
    };
    tracing::info!(path = %path.display(), "training from the shard on disk");
    let set = PackedSet::open(&path).map_err(|e| format!("the shard does not open: {e}"))?;
    Ok((set, from))
}

fn shard_name(welcome: &Welcome) -> String {
    format!("{}/{}", welcome.shard.index, welcome.shard.count)
}

/// Downloads this session's shard into `sink`, a frame at a time (at least
/// 100 kB/s, and a minute for the rest).
async fn fetch_into(
    fetch: &Fetch<'_>,
    welcome: &Welcome,
    sink: &mut (dyn FnMut(&[u8]) -> std::io::Result<()> + Send),
) -> Result<u64, String> {
    let (shard, download) = (
        welcome.shard,
        welcome.download.as_ref().ok_or("no shard download")?,
    );
    let mb = download.bytes as f64 / 1e6;
    fetch.bar.set_message(format!(
        "downloading shard {} ({mb:.1} MB)",
        shard_name(welcome)
    ));
    tracing::info!(
        from = %fetch.endpoint.http_base(),
        "downloading shard {} ({mb:.1} MB)",
        shard_name(welcome)
    );
    let path = format!(
        "/api/shard?index={}&count={}&seed={}&data={}",
        shard.index, shard.count, shard.seed, download.data
    );
    let timeout = Duration::from_secs(60 + download.bytes / 100_000);
    fetch
        .endpoint
        .get_to(
            &path,
            &[(SESSION_HEADER, welcome.session.to_string())],
            download.bytes,
            timeout,
            sink,
        )
        .await
        .map_err(|e| format!("shard download failed: {e}"))
}

/// Header the shard download names the session in (the server's `SESSION_HEADER`).
const SESSION_HEADER: &str = "x-tether-session";
