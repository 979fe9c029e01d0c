//! The generated services serve and call each other at the paths SPIFFE
//! clients and sigil agents expect.

use std::pin::Pin;

use sigil_proto::server::v1::{admin_api_server, agent_api_server};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::spiffe_workload_api_server::{
    self, SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct OneSvid;

#[tonic::async_trait]
impl SpiffeWorkloadApi for OneSvid {
    type FetchX509SVIDStream = Stream_<X509svidResponse>;
    type FetchX509BundlesStream = Stream_<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream_<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let svid = X509svid {
            spiffe_id: "spiffe://example.org/web".into(),
            x509_svid: vec![1, 2, 3],
            hint: "web".into(),
            ..Default::default()
        };
        let msg = X509svidResponse {
            svids: vec![svid],
            ..Default::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(msg)]))))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn fetch_jwtsvid(
        &self,
        _: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("test"))
    }
}

#[test]
fn service_names() {
    // Package-less, as every SPIFFE client expects.
    assert_eq!(
        spiffe_workload_api_server::SERVICE_NAME,
        "SpiffeWorkloadAPI"
    );
    assert_eq!(agent_api_server::SERVICE_NAME, "sigil.server.v1.AgentApi");
    assert_eq!(admin_api_server::SERVICE_NAME, "sigil.server.v1.AdminApi");
}

#[tokio::test]
async fn workload_api_round_trip() -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(OneSvid))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut client = SpiffeWorkloadApiClient::connect(format!("http://{addr}")).await?;
    let mut stream = client
        .fetch_x509svid(X509svidRequest {})
        .await?
        .into_inner();
    let first = stream.next().await.ok_or("no response")??;
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/web");
    assert_eq!(first.svids[0].x509_svid, vec![1, 2, 3]);
    assert!(stream.next().await.is_none());

    let err = client
        .fetch_jwtsvid(JwtsvidRequest::default())
        .await
        .err()
        .ok_or("expected an error")?;
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    server.abort();
    Ok(())
}
