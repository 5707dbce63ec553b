//! What the server hands to and takes from clients it does not trust: secrets drawn
//! from the operating system's CSPRNG, and strings cut to a bound the server chose.

/// `N` bytes from the operating system's CSPRNG (sessions and tickets are
/// bearer secrets: a session id also authorises its shard's download).
pub fn secret_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the operating system's random source works");
    bytes
}

/// At most `max` characters of a client-supplied `text` (cut with "…"): whatever a
/// client names itself or provokes in a rejection ends up in every status and
/// dashboard push, so its size must not be the client's choice.
pub fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

/// The longest device or backend name kept for a worker.
pub const MAX_NAME_CHARS: usize = 80;
/// The longest rejection text kept for the dashboard.
pub const MAX_REASON_CHARS: usize = 240;
