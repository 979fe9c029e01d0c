//! The SPIFFE Workload API client. It sends the `workload.spiffe.io: true`
//! header on every call (SPIFFE Workload API specification, §6.2, "Request
//! Metadata"), so no caller has to remember it.

use std::path::Path;

use sigil_proto::workload as pb;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::connect::{ConnectError, UnixConnector};

/// The metadata key every Workload API request carries.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Adds [`SECURITY_HEADER`]`: true` to a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecurityHeader;

impl Interceptor for SecurityHeader {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        Ok(req)
    }
}

/// A Workload API client on one channel.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    inner: SpiffeWorkloadApiClient<InterceptedService<Channel, SecurityHeader>>,
}

impl WorkloadClient {
    /// Connects to the Workload API socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ConnectError> {
        Self::connect_with(&UnixConnector::new(path)).await
    }

    /// Connects through `connector`.
    pub async fn connect_with(connector: &UnixConnector) -> Result<Self, ConnectError> {
        Ok(Self::new(connector.connect().await?))
    }

    /// A client on an open channel.
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: SpiffeWorkloadApiClient::with_interceptor(channel, SecurityHeader),
        }
    }

    /// `FetchX509SVID`: this process's X509-SVIDs, then every change.
    pub async fn fetch_x509svid(&mut self) -> Result<Streaming<pb::X509svidResponse>, Status> {
        Ok(self
            .inner
            .fetch_x509svid(pb::X509svidRequest {})
            .await?
            .into_inner())
    }

    /// `FetchX509Bundles`: the X.509 bundles, then every change.
    pub async fn fetch_x509_bundles(
        &mut self,
    ) -> Result<Streaming<pb::X509BundlesResponse>, Status> {
        Ok(self
            .inner
            .fetch_x509_bundles(pb::X509BundlesRequest {})
            .await?
            .into_inner())
    }

    /// `FetchJWTSVID`: JWT-SVIDs for an audience.
    pub async fn fetch_jwtsvid(
        &mut self,
        req: pb::JwtsvidRequest,
    ) -> Result<pb::JwtsvidResponse, Status> {
        Ok(self.inner.fetch_jwtsvid(req).await?.into_inner())
    }

    /// `FetchJWTBundles`: the JWT bundles, then every change.
    pub async fn fetch_jwt_bundles(&mut self) -> Result<Streaming<pb::JwtBundlesResponse>, Status> {
        Ok(self
            .inner
            .fetch_jwt_bundles(pb::JwtBundlesRequest {})
            .await?
            .into_inner())
    }

    /// `ValidateJWTSVID`: checks a JWT-SVID for an audience.
    pub async fn validate_jwtsvid(
        &mut self,
        req: pb::ValidateJwtsvidRequest,
    ) -> Result<pb::ValidateJwtsvidResponse, Status> {
        Ok(self.inner.validate_jwtsvid(req).await?.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio_stream::wrappers::UnixListenerStream;
    use tonic::Code;
    use tonic::service::{InterceptorLayer, Routes};

    use super::*;

    /// A server on a socket in a temporary directory that records the
    /// security header of every request, then answers `Unimplemented` (it
    /// serves no method): an answer at all shows the request arrived.
    #[tokio::test]
    async fn every_call_carries_the_security_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
        let record = {
            let seen = seen.clone();
            move |req: Request<()>| {
                let value = req
                    .metadata()
                    .get(SECURITY_HEADER)
                    .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
                seen.lock().unwrap().push(value);
                Ok(req)
            }
        };
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(InterceptorLayer::new(record))
                .add_routes(Routes::default())
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );

        let addr = format!("unix://{}", path.display());
        let connector = UnixConnector::from_address(&addr).unwrap();
        let mut client = WorkloadClient::connect_with(&connector).await.unwrap();
        let codes = [
            client.fetch_x509svid().await.map(drop),
            client.fetch_x509_bundles().await.map(drop),
            client.fetch_jwtsvid(Default::default()).await.map(drop),
            client.fetch_jwt_bundles().await.map(drop),
            client.validate_jwtsvid(Default::default()).await.map(drop),
        ]
        .map(|r| r.map_err(|s| s.code()));
        assert_eq!(codes, [Err(Code::Unimplemented); 5]);
        assert_eq!(*seen.lock().unwrap(), vec![Some("true".to_owned()); 5]);
        server.abort();
    }
}
