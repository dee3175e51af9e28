//! The standard gRPC health service (`grpc.health.v1.Health`, the messages from
//! `tonic-health`), answered from the registry: the service `""` is the server, SERVING
//! while `/v2/health/ready` is ready (`api::probe`: not while loading or draining); a
//! model's (or endpoint's) name is SERVING while a version of it is available, as its
//! ready route says, NOT_SERVING otherwise (loading, unloaded, failed), and NOT_FOUND
//! when the server never had it. `Watch` answers the status now and again each time it
//! changes (woken by the registry's state changes).

use crate::api::{ApiError, AppState};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

pub struct HealthService {
    pub state: AppState,
}

/// The status of `service` now; NOT_FOUND for a name the server does not know.
fn status_of(state: &AppState, service: &str) -> Result<ServingStatus, Status> {
    if service.is_empty() {
        return Ok(if state.probe.is_ready(&state.registry) {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        });
    }
    let name = crate::api::model_name(service).map_err(super::status)?;
    match crate::api::resolve_model(state, name, None, None) {
        Ok(_) => Ok(ServingStatus::Serving),
        Err(ApiError::Unavailable(_)) => Ok(ServingStatus::NotServing),
        Err(e) => Err(super::status(e)),
    }
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = status_of(&self.state, &request.get_ref().service);
        super::count(&self.state, &status);
        Ok(Response::new(answer(status?)))
    }

    type WatchStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let state = self.state.clone();
        // Subscribed before the first look, so no change after it is missed.
        let changes = state.registry.changes();
        // The name is checked once: an unknown one fails the call at once.
        let first = status_of(&state, &service);
        super::count(&state, &first);
        let first = first?;
        let stream = futures::stream::unfold(
            (Some(first), first, changes, state, service),
            |(pending, last, mut changes, state, service)| async move {
                let now = match pending {
                    Some(s) => s,
                    None => loop {
                        changes.changed().await.ok()?;
                        // A model deleted while watched answers SERVICE_UNKNOWN.
                        let now =
                            status_of(&state, &service).unwrap_or(ServingStatus::ServiceUnknown);
                        if now != last {
                            break now;
                        }
                    },
                };
                Some((Ok(answer(now)), (None, now, changes, state, service)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
