//! tether's parameter server: keeps the center variable x̃, accepts elastic updates
//! from workers over WebSockets, checkpoints, and hosts the dashboard.
//!
//! Not built yet: issue #3 fills this crate (axum `app(state) -> Router` and
//! `run(listener, config, shutdown)`). The center's update rules it will apply already
//! live in [`tether_shared::algorithms`].
